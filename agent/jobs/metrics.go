package jobs

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the collectors a Manager updates. NewMetrics builds them;
// the owner of the registry registers Collectors, so a Manager never
// touches a registry itself.
type Metrics struct {
	Finished         *prometheus.CounterVec   // kind, outcome
	Duration         *prometheus.HistogramVec // kind
	Active           *prometheus.GaugeVec     // kind, state (waiting|running)
	BackupPeak       prometheus.Gauge
	CallbacksGivenUp prometheus.Counter
}

// NewMetrics builds the job collectors, unregistered.
func NewMetrics() *Metrics {
	return &Metrics{
		Finished: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imagestore_agent_jobs_total",
			Help: "Async jobs finished, by kind and outcome (succeeded, failed, cancelled).",
		}, []string{"kind", "outcome"}),
		Duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "imagestore_agent_job_duration_seconds",
			Help:    "Run time of finished async jobs (excluding queueing), by kind.",
			Buckets: prometheus.ExponentialBuckets(0.01, 4, 10),
		}, []string{"kind"}),
		Active: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "imagestore_agent_jobs",
			Help: "Async jobs currently waiting or running, by kind and state.",
		}, []string{"kind", "state"}),
		BackupPeak: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "imagestore_agent_backup_jobs_running_peak",
			Help: "Highest number of backup jobs observed running at once since start (bounded by parallelismDegree).",
		}),
		CallbacksGivenUp: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagestore_agent_callbacks_given_up_total",
			Help: "Callbacks abandoned after every retry failed.",
		}),
	}
}

// Collectors lists every collector, for registering.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.Finished, m.Duration, m.Active, m.BackupPeak, m.CallbacksGivenUp}
}
