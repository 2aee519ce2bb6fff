package nbdtarget

import "github.com/prometheus/client_golang/prometheus"

var descServers = prometheus.NewDesc("imagestore_agent_nbd_servers",
	"Running qemu-nbd servers by kind: target (writable backup targets) or remote (stored chain exports).", []string{"kind"}, nil)

// Collector reports the running servers by kind at scrape time.
func (s *Service) Collector() prometheus.Collector { return collector{s} }

type collector struct{ s *Service }

func (c collector) Describe(ch chan<- *prometheus.Desc) { ch <- descServers }

func (c collector) Collect(ch chan<- prometheus.Metric) {
	m, err := c.s.manager()
	if err != nil {
		return
	}
	w, r := m.Count()
	ch <- prometheus.MustNewConstMetric(descServers, prometheus.GaugeValue, float64(w), "target")
	ch <- prometheus.MustNewConstMetric(descServers, prometheus.GaugeValue, float64(r), "remote")
}
