package agent

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"imagestore/agent/jobs"
	"imagestore/internal/version"
)

// metrics holds every collector the agent exports. They live on the agent's
// own registry (Agent.Registry) so the :8000 registry server can add its own.
type metrics struct {
	jobs           *jobs.Metrics
	bytesIngested  prometheus.Counter
	bytesExported  prometheus.Counter
	gcFreed        prometheus.Counter
	verifyFailures prometheus.Counter
	verifyRuns     prometheus.Counter
	httpRequests   *prometheus.CounterVec   // route, code
	httpDuration   *prometheus.HistogramVec // route
}

// buildInfo is imagestore_build_info: 1, labelled with what the binary was
// built from (internal/version), so a fleet's versions show in one query.
func buildInfo() prometheus.Collector {
	in := version.Get()
	modified := "false"
	if in.Modified {
		modified = "true"
	}
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "imagestore_build_info",
		Help: "Always 1; the labels say which build is running.",
	}, []string{"version", "revision", "modified", "goversion"})
	g.WithLabelValues(in.Version, in.Revision, modified, in.GoVersion).Set(1)
	return g
}

func newMetrics(reg *prometheus.Registry, capacity func() (storeStats, bool)) *metrics {
	reg.MustRegister(buildInfo())
	m := &metrics{
		jobs: jobs.NewMetrics(),
		bytesIngested: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagestore_agent_ingested_bytes_total",
			Help: "Bytes read into the store by imports.",
		}),
		bytesExported: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagestore_agent_exported_bytes_total",
			Help: "Bytes served from export URLs and written into exports.",
		}),
		gcFreed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagestore_agent_gc_freed_bytes_total",
			Help: "Bytes freed by garbage collection.",
		}),
		verifyFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagestore_agent_verify_failures_total",
			Help: "Blobs found corrupt (and quarantined) by verification.",
		}),
		verifyRuns: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagestore_agent_verify_runs_total",
			Help: "Periodic scrubs completed.",
		}),
		httpRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imagestore_agent_http_requests_total",
			Help: "HTTP requests on the management port, by route pattern and status code.",
		}, []string{"route", "code"}),
		httpDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "imagestore_agent_http_request_duration_seconds",
			Help:    "HTTP request handling time on the management port, by route pattern.",
			Buckets: prometheus.DefBuckets,
		}, []string{"route"}),
	}
	reg.MustRegister(m.jobs.Collectors()...)
	reg.MustRegister(m.bytesIngested, m.bytesExported, m.gcFreed, m.verifyFailures, m.verifyRuns, m.httpRequests, m.httpDuration)
	reg.MustRegister(&storeCollector{capacity: capacity})
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

type storeStats struct {
	Total, Used, Free, Quota int64
	Blobs, Images            int
}

// storeCollector reads capacity at scrape time, so the numbers are never stale.
type storeCollector struct {
	capacity func() (storeStats, bool)
}

var (
	descStoreBytes  = prometheus.NewDesc("imagestore_store_bytes", "Store capacity in bytes by kind: total, used, free, quota (0 = no quota).", []string{"kind"}, nil)
	descStoreBlobs  = prometheus.NewDesc("imagestore_store_blobs", "Committed blobs in the store.", nil, nil)
	descStoreImages = prometheus.NewDesc("imagestore_store_images", "Image records in the store.", nil, nil)
)

func (c *storeCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descStoreBytes
	ch <- descStoreBlobs
	ch <- descStoreImages
}

func (c *storeCollector) Collect(ch chan<- prometheus.Metric) {
	s, ok := c.capacity()
	if !ok {
		return
	}
	for _, kv := range []struct {
		k string
		v int64
	}{{"total", s.Total}, {"used", s.Used}, {"free", s.Free}, {"quota", s.Quota}} {
		ch <- prometheus.MustNewConstMetric(descStoreBytes, prometheus.GaugeValue, float64(kv.v), kv.k)
	}
	ch <- prometheus.MustNewConstMetric(descStoreBlobs, prometheus.GaugeValue, float64(s.Blobs))
	ch <- prometheus.MustNewConstMetric(descStoreImages, prometheus.GaugeValue, float64(s.Images))
}
