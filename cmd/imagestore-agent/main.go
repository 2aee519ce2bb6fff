// Command imagestore-agent is the backup-storage daemon: the management
// protocol on :8001 (package agent) and the registry on :8000.
//
// Configuration: defaults, then -config FILE (YAML), then IMAGESTORE_*
// environment variables, then flags. See docs/agent-protocol.md.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"imagestore/agent"
	"imagestore/agent/config"
	"imagestore/blobstore"
	s3store "imagestore/blobstore/s3"
	"imagestore/internal/connlimit"
	"imagestore/internal/redact"
	"imagestore/internal/version"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

// options are flags that override the configuration when given.
type options struct {
	configPath   string
	printConfig  bool
	printVersion bool
	logFile      string // -logfile: run detached, logging to this file
}

func parseFlags(args []string, stderr io.Writer) (config.Config, options, error) {
	fs := flag.NewFlagSet("imagestore-agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o options
	fs.StringVar(&o.configPath, "config", "", "YAML configuration file")
	fs.BoolVar(&o.printConfig, "print-config", false, "print the effective configuration (secrets redacted) and exit")
	profile := fs.String("profile", "", "defaults to start from: zstack (the management node's contract; the default) or imagestore")
	fs.BoolVar(&o.printVersion, "version", false, "print the version and exit")
	fs.StringVar(&o.configPath, "conf", "", "same as -config (the spelling zstack-ctl uses)")
	fs.StringVar(&o.logFile, "logfile", "", "start in the background, detached, logging to this file, and return (as zstack-ctl expects of zstore)")
	root := fs.String("root", "", "store root directory (default ./data)")
	listen := fs.String("listen", "", "management protocol address (default :8001)")
	regListen := fs.String("registry-listen", "", "registry address (default :8000)")
	maxConns := fs.Int("max-connections", 0, "connections open at once on the management port; more wait (default 1024)")
	regMaxConns := fs.Int("registry-max-connections", 0, "connections open at once on the registry port; more wait (default 1024)")
	token := fs.String("token", "", "bearer token required on every endpoint but /health (prefer -token-file)")
	tokenFile := fs.String("token-file", "", "file holding the bearer token")
	tlsCert := fs.String("tls-cert", "", "TLS certificate (PEM); enables HTTPS with -tls-key")
	tlsKey := fs.String("tls-key", "", "TLS private key (PEM)")
	quota := fs.String("quota", "", "store quota, e.g. 500GiB (0 = none)")
	par := fs.Int("parallelism", 0, "parallelismDegree: backup jobs running at once (default 10)")
	logLevel := fs.String("log-level", "", "debug, info, warn or error")
	logFormat := fs.String("log-format", "", "text or json")
	if err := fs.Parse(args); err != nil {
		return config.Config{}, o, err
	}
	if o.printVersion {
		return config.Config{}, o, nil
	}
	if fs.NArg() > 0 {
		return config.Config{}, o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	cfg, err := config.LoadProfile(o.configPath, *profile)
	if err != nil {
		return cfg, o, err
	}
	var ferr error
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "root":
			cfg.Root = *root
		case "listen":
			cfg.Listen = *listen
		case "registry-listen":
			cfg.RegistryListen = *regListen
		case "max-connections":
			cfg.MaxConnections = *maxConns
		case "registry-max-connections":
			cfg.RegistryMaxConnections = *regMaxConns
		case "token":
			cfg.Token = config.Secret(*token)
		case "token-file":
			cfg.TokenFile = *tokenFile
		case "tls-cert":
			cfg.TLS.Cert = *tlsCert
		case "tls-key":
			cfg.TLS.Key = *tlsKey
		case "quota":
			q, err := config.ParseByteSize(*quota)
			if err != nil {
				ferr = errors.Join(ferr, fmt.Errorf("-quota: %w", err))
			}
			cfg.Quota = q
		case "parallelism":
			cfg.ParallelismDegree = *par
		case "log-level":
			cfg.LogLevel = *logLevel
		case "log-format":
			cfg.LogFormat = *logFormat
		}
	})
	if ferr != nil {
		return cfg, o, ferr
	}
	if err := cfg.ResolveToken(); err != nil {
		return cfg, o, err
	}
	if err := cfg.Validate(); err != nil {
		return cfg, o, err
	}
	return cfg, o, cfg.ResolveStorageCredentials(os.LookupEnv)
}

func run(args []string, stderr io.Writer) int {
	cfg, o, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "imagestore-agent:", err)
		return 2
	}
	if o.printVersion {
		fmt.Fprintln(os.Stdout, "imagestore-agent", version.String())
		return 0
	}
	if o.printConfig {
		fmt.Fprint(os.Stdout, cfg.String())
		return 0
	}
	if err := cfg.CheckFiles(); err != nil {
		fmt.Fprintln(stderr, "imagestore-agent:", err)
		return 2
	}
	if o.logFile != "" && os.Getenv(detachedEnv) == "" {
		if err := detach(args, o.logFile); err != nil {
			fmt.Fprintln(stderr, "imagestore-agent:", err)
			return 1
		}
		return 0
	}
	logger, err := config.NewLogger(stderr, cfg)
	if err != nil {
		fmt.Fprintln(stderr, "imagestore-agent:", err)
		return 2
	}
	if err := serve(cfg, logger); err != nil {
		logger.Error("exiting", "err", err)
		var se *storageError
		if errors.As(err, &se) {
			// On stderr too, in plain words, like the other start errors.
			fmt.Fprintln(stderr, "imagestore-agent:", err)
			return 2
		}
		return 1
	}
	return 0
}

// storageError: the configured storage cannot be used (an S3 endpoint that
// does not answer, a certificate its CAs do not vouch for, keys it refuses,
// a bucket that does not exist): a configuration problem, exit 2 like the
// others.
type storageError struct{ err error }

func (e *storageError) Error() string { return e.err.Error() }
func (e *storageError) Unwrap() error { return e.err }

// openStore opens the blob store where cfg.Storage says: under cfg.Root,
// or in an S3 bucket (checked at once: reachable, keys accepted, bucket
// present).
func openStore(ctx context.Context, cfg config.Config, logger *slog.Logger) (*blobstore.Store, error) {
	opts := blobstore.Options{Root: cfg.Root, Quota: int64(cfg.Quota), CommitGrace: cfg.GCGrace, Logger: logger}
	if cfg.Storage.IsS3() {
		st := cfg.Storage
		be, err := s3store.New(ctx, s3store.Options{
			Endpoint:   st.Endpoint,
			Bucket:     st.Bucket,
			Prefix:     st.Prefix,
			Region:     st.Region,
			PathStyle:  st.PathStyle,
			AccessKey:  st.AccessKey,
			SecretKey:  st.SecretKey,
			CAFile:     st.CAFile,
			PartSize:   int64(st.PartSize),
			CacheBytes: int64(st.CacheBytes),
			Logger:     logger,
		})
		if err != nil {
			return nil, &storageError{fmt.Errorf("storage: s3 bucket %q at %s (keys from %s): %w",
				st.Bucket, redact.URL(st.Endpoint), st.CredentialSource(), err)}
		}
		opts.Backend = be
	}
	store, err := blobstore.Open(ctx, opts)
	if err != nil {
		if opts.Backend != nil {
			_ = opts.Backend.Close()
		}
		return nil, fmt.Errorf("opening store: %w", err)
	}
	return store, nil
}

func serve(cfg config.Config, logger *slog.Logger) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	logger.Info("starting", "profile", cfg.Profile, "root", cfg.Root, "listen", cfg.Listen, "registryListen", cfg.RegistryListen,
		"auth", cfg.Token != "", "agentTLS", cfg.AgentListenerTLS().Enabled(), "registryTLS", cfg.RegistryListenerTLS().Enabled(),
		"serverName", cfg.ServerName, "parallelismDegree", cfg.ParallelismDegree, "gcGrace", cfg.GCGrace,
		"maxConnections", cfg.MaxConnections, "registryMaxConnections", cfg.RegistryMaxConnections)
	if st := cfg.Storage; st.IsS3() {
		logger.Info("storage", "type", st.Type, "endpoint", redact.URL(st.Endpoint), "bucket", st.Bucket, "prefix", st.Prefix,
			"pathStyle", st.PathStyle, "keys", st.CredentialSource(), "caFile", st.CAFile)
		if cfg.GCGrace < config.DefaultS3GCGrace {
			logger.Warn("gcGrace is shorter than the default for a bucket: if other agents share this bucket and prefix, GC here may free a blob another agent committed and has not recorded yet",
				"gcGrace", cfg.GCGrace, "default", config.DefaultS3GCGrace)
		}
	}
	if cfg.Profile == config.ProfileZStack && cfg.Token != "" {
		logger.Warn("a token is set in the zstack profile: the management node, KVM hosts and peer stores send none, so their calls will be refused")
	}
	if err := os.MkdirAll(cfg.Root, 0o750); err != nil {
		return err
	}
	store, err := openStore(ctx, cfg, logger)
	if err != nil {
		return err
	}
	defer store.Close()

	a, err := agent.New(cfg, store, logger)
	if err != nil {
		return err
	}
	srv, ln, err := managementServer(cfg, a.Handler(), a.Registry(), logger)
	if err != nil {
		return err
	}
	regShutdown, err := startRegistry(ctx, cfg, store, a.Registry(), logger)
	if err != nil {
		ln.Close()
		return fmt.Errorf("registry: %w", err)
	}
	if cfg.PIDFile != "" {
		if err := writePIDFile(cfg.PIDFile); err != nil {
			ln.Close()
			_ = regShutdown(context.Background())
			return err
		}
		// Removed when serve returns: after the agent and its qemu-nbd servers stopped.
		defer removePIDFile(cfg.PIDFile, logger)
	}

	bg, cancelBg := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); _ = a.Run(bg) }()
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	logger.Info("listening", "addr", ln.Addr().String(), "tls", srv.TLSConfig != nil)
	if err := sdNotify("READY=1"); err != nil {
		logger.Warn("systemd notify", "err", err)
	}
	if every := watchdogInterval(); every > 0 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			watchdog(bg, every, func() bool { _, err := store.Capacity(); return err == nil })
		}()
	}

	var runErr error
	select {
	case <-ctx.Done():
		logger.Info("shutting down")
	case runErr = <-serveErr:
	}
	_ = sdNotify("STOPPING=1")
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	stopServing(sctx, srv, a, regShutdown, logger)
	cancelBg()
	wg.Wait()
	// A stopped agent leaves no process of its own: Close stops every
	// qemu-nbd (NBD targets, remote targets; SIGTERM, then SIGKILL).
	if err := a.Close(); err != nil {
		logger.Warn("closing the agent", "err", err)
	}
	logger.Info("stopped")
	if runErr != nil && !errors.Is(runErr, http.ErrServerClosed) {
		return runErr
	}
	return nil
}

// managementServer listens on cfg.Listen, with at most cfg.MaxConnections
// open, with TLS when the agent port has a certificate
// (cfg.AgentListenerTLS), and returns the server for h and its listener.
func managementServer(cfg config.Config, h http.Handler, reg prometheus.Registerer, logger *slog.Logger) (*http.Server, net.Listener, error) {
	ln, err := listenCapped(cfg.Listen, cfg.MaxConnections, "agent", reg)
	if err != nil {
		return nil, nil, err
	}
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
	if t := cfg.AgentListenerTLS(); t.Enabled() {
		srv.TLSConfig, err = serverTLS(t)
		if err != nil {
			ln.Close()
			return nil, nil, fmt.Errorf("agent port: %w", err)
		}
		ln = tls.NewListener(ln, srv.TLSConfig)
	}
	return srv, ln, nil
}

// listenCapped listens on addr with at most limit connections open
// (internal/connlimit) and registers the port's connection gauges. TLS, if
// any, goes on top: net/http serves TLS only on a *tls.Conn it gets itself.
func listenCapped(addr string, limit int, port string, reg prometheus.Registerer) (net.Listener, error) {
	tcp, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	ln, err := connlimit.New(tcp, limit)
	if err != nil {
		tcp.Close()
		return nil, err
	}
	labels := prometheus.Labels{"port": port}
	open := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name:        "imagestore_open_connections",
		Help:        "Connections open on the port (agent: listen, registry: registryListen).",
		ConstLabels: labels,
	}, func() float64 { return float64(ln.Open()) })
	limitGauge := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name:        "imagestore_max_connections",
		Help:        "The port's cap on open connections (maxConnections, registryMaxConnections); clients beyond it wait.",
		ConstLabels: labels,
	}, func() float64 { return float64(ln.Limit()) })
	if err := errors.Join(reg.Register(open), reg.Register(limitGauge)); err != nil {
		ln.Close()
		return nil, fmt.Errorf("%s port metrics: %w", port, err)
	}
	return ln, nil
}

// serverTLS loads one port's certificate.
func serverTLS(t config.TLS) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(t.Cert, t.Key)
	if err != nil {
		return nil, fmt.Errorf("tls: %w", err)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}

// stopServing stops the HTTP server and the jobs, then the registry, each
// within ctx. Jobs are stopped alongside the HTTP server, so a -sync
// request waiting on a long job gets its (failed) answer instead of
// holding up the shutdown; short requests simply finish.
func stopServing(ctx context.Context, srv *http.Server, a *agent.Agent, regShutdown func(context.Context) error, logger *slog.Logger) {
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		if err := srv.Shutdown(ctx); err != nil {
			logger.Warn("http shutdown", "err", err)
		}
	}()
	go func() {
		defer wg.Done()
		if err := a.Shutdown(ctx); err != nil {
			logger.Warn("job shutdown", "err", err)
		}
	}()
	wg.Wait()
	if err := regShutdown(ctx); err != nil {
		logger.Warn("registry shutdown", "err", err)
	}
}
