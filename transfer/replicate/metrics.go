package replicate

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the replication counters, shared by the engine and the
// registry server (which counts blob bytes it serves and receives).
type Metrics struct {
	// SentBytes counts blob bytes leaving this store: pushes and blob GETs served.
	SentBytes prometheus.Counter
	// ReceivedBytes counts blob bytes arriving: pulls and uploads received.
	ReceivedBytes prometheus.Counter
	Tasks         *prometheus.CounterVec // kind (push|pull), outcome (success|failed|existed)
	BlobsSkipped  prometheus.Counter
	BlobsSent     prometheus.Counter
	TasksRunning  prometheus.Gauge
	// Bandwidth is the store-wide default budget of one task, by direction
	// (write = push, read = pull); 0 = unlimited.
	Bandwidth *prometheus.GaugeVec
}

// NewMetrics registers the collectors on reg (nil = unregistered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		SentBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagestore_replication_sent_bytes_total",
			Help: "Blob bytes sent by this store: replication pushes and registry blob downloads (uncompressed).",
		}),
		ReceivedBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagestore_replication_received_bytes_total",
			Help: "Blob bytes received by this store: replication pulls and registry uploads (uncompressed).",
		}),
		Tasks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imagestore_replication_tasks_total",
			Help: "Replication requests finished, by kind (push, pull) and outcome (success, failed, existed).",
		}, []string{"kind", "outcome"}),
		BlobsSkipped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagestore_replication_blobs_skipped_total",
			Help: "Blobs not transferred because the receiving side already held them.",
		}),
		BlobsSent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagestore_replication_blobs_transferred_total",
			Help: "Blobs transferred and committed by replication tasks.",
		}),
		TasksRunning: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "imagestore_replication_tasks_running",
			Help: "Replication tasks currently running.",
		}),
		Bandwidth: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "imagestore_replication_bandwidth_limit_bytes_per_second",
			Help: "Default per-task replication bandwidth budget by direction (write: push, read: pull); 0 means unlimited.",
		}, []string{"direction"}),
	}
	for _, k := range []string{"push", "pull"} {
		for _, o := range []string{"success", "failed", "existed"} {
			m.Tasks.WithLabelValues(k, o)
		}
	}
	if reg != nil {
		reg.MustRegister(m.SentBytes, m.ReceivedBytes, m.Tasks, m.BlobsSkipped, m.BlobsSent, m.TasksRunning, m.Bandwidth)
	}
	return m
}
