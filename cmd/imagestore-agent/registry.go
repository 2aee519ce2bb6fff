package main

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net/http"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"imagestore/agent/config"
	"imagestore/blobstore"
	"imagestore/transfer/registry"
	"imagestore/transfer/replicate"
)

// startRegistry serves the registry port (transfer/registry): the OCI
// distribution API under /v2 and replication under /v1, with the registry
// port's certificate (cfg.RegistryListenerTLS) and the agent's token, and
// at most cfg.RegistryMaxConnections connections open.
func startRegistry(ctx context.Context, cfg config.Config, store *blobstore.Store, reg *prometheus.Registry, logger *slog.Logger) (shutdown func(context.Context) error, err error) {
	log := logger.With("component", "registry")
	m := replicate.NewMetrics(reg)
	rc := cfg.Replication
	eng, err := replicate.New(replicate.Options{
		Store:          store,
		Dir:            filepath.Join(cfg.Root, "registry", "tasks"),
		MaxTasks:       rc.MaxTasks,
		Parallelism:    rc.Parallelism,
		ReadBandwidth:  int64(rc.NetworkReadBandwidth),
		WriteBandwidth: int64(rc.NetworkWriteBandwidth),
		Retries:        rc.Retries,
		Retention:      cfg.JobRetention,
		PeerServerName: cfg.ServerName,
		Metrics:        m,
		Logger:         log,
	})
	if err != nil {
		return nil, err
	}
	srv, err := registry.New(registry.Options{Store: store, Engine: eng, Token: string(cfg.Token), Metrics: m, Logger: log, MaxBodyBytes: cfg.MaxBodyBytes})
	if err != nil {
		eng.Close()
		return nil, err
	}
	ln, err := listenCapped(cfg.RegistryListen, cfg.RegistryMaxConnections, "registry", reg)
	if err != nil {
		eng.Close()
		return nil, err
	}
	hs := &http.Server{
		Handler:           srv.Handler(),
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	scheme := "http"
	if t := cfg.RegistryListenerTLS(); t.Enabled() {
		hs.TLSConfig, err = serverTLS(t)
		if err != nil {
			ln.Close()
			eng.Close()
			return nil, err
		}
		ln = tls.NewListener(ln, hs.TLSConfig)
		scheme = "https"
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := hs.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("registry server stopped", "err", err)
		}
	}()
	log.Info("registry listening", "addr", ln.Addr().String(), "scheme", scheme)
	return func(sctx context.Context) error {
		// Stop tasks first so their outgoing transfers end, then the server;
		// a long incoming upload is cut at the deadline and stays resumable.
		eng.Close()
		err := hs.Shutdown(sctx)
		if err != nil {
			hs.Close()
		}
		<-done
		return err
	}, nil
}
