package config

import (
	"fmt"
	"io"
	"log/slog"
	"strings"
)

// ParseLogLevel maps debug|info|warn|error to a slog level.
func ParseLogLevel(s string) (slog.Level, error) {
	switch strings.ToLower(s) {
	case "debug":
		return slog.LevelDebug, nil
	case "", "info":
		return slog.LevelInfo, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("logLevel: %q, want debug, info, warn or error", s)
}

// NewLogger builds the daemon's structured logger from the config.
func NewLogger(w io.Writer, cfg Config) (*slog.Logger, error) {
	lvl, err := ParseLogLevel(cfg.LogLevel)
	if err != nil {
		return nil, err
	}
	opts := &slog.HandlerOptions{Level: lvl}
	switch cfg.LogFormat {
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	case "", "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("logFormat: %q, want text or json", cfg.LogFormat)
}
