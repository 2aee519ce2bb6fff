package main

import (
	"context"
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"

	"imagestore/agent"
	"imagestore/blobstore"
)

// startRegistry starts the :8000 registry server (agent/registry). This is
// the seam the registry feature replaces; until then it serves nothing.
func startRegistry(ctx context.Context, cfg agent.Config, store *blobstore.Store, reg *prometheus.Registry, logger *slog.Logger) (shutdown func(context.Context) error, err error) {
	logger.Info("registry port not served yet (agent/registry not built in)", "registryListen", cfg.RegistryListen)
	return func(context.Context) error { return nil }, nil
}
