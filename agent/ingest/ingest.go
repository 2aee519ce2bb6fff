// Package ingest brings images into the store: files KVM hosts wrote into
// upload dirs (import-backup), downloads (http(s) with resume, sftp, file)
// and host-CLI upload streams (import), database backups checked against
// their md5, and templates flattened from a stored chain. Every path ends
// in a committed blob and an image record.
package ingest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"imagestore/agent/images"
	"imagestore/agent/uploads"
	"imagestore/blobstore"
	"imagestore/internal/retry"
	"imagestore/layer"
	"imagestore/transfer/sshfs"
)

// Options configure the service.
type Options struct {
	Store   *blobstore.Store
	Layers  *layer.Store     // commits blobs and records them; opens chains
	Images  *images.Service  // looks up parents
	Uploads *uploads.Uploads // confines and opens host-written files; upload:// sessions
	// MaxImportSize caps one URL import's download; 0 = no cap.
	MaxImportSize int64
	// KnownHostsFile verifies sftp:// hosts; SSHKeyFile (a PEM private
	// key) logs in unless the URL carries a password.
	KnownHostsFile, SSHKeyFile string
	// OpenSFTP opens a file on an SSH host (the agent's shared connection
	// pool, which reconnects on a cut).
	OpenSFTP func(ctx context.Context, h sshfs.Host, path string) (sshfs.File, error)
	// ReleaseProcess stops the writers of an import-backup's
	// processToRelease (an NBD target group) before the file is read;
	// nil: the field is ignored.
	ReleaseProcess func(desc string) error
	// PullChain copies the image ref and its ancestors, records and blobs,
	// from the store whose registry is at addr (host:port), verifying its
	// certificate against caPEM (the zstore:// import's cacert); nil: a
	// zstore:// import of an image this store lacks fails.
	PullChain func(ctx context.Context, addr, caPEM string, ref blobstore.Ref) error
	// RegistryPort is the port of a peer's registry when a zstore:// URL
	// names none (default "8000").
	RegistryPort string
	// HTTPClient downloads http(s) imports; default: no overall timeout
	// (images are large), stalls caught by a one-minute response-header
	// timeout and by the context.
	HTTPClient *http.Client
	// Resume paces the retries of a cut http(s) download; zero: up to 5
	// attempts in all, waits from 200 ms doubling to at most 2 s, ±20 %.
	// Its Retryable and OnRetry are the service's own.
	Resume retry.Policy
	// Ingested counts the bytes imports read into the store; nil: not counted.
	Ingested prometheus.Counter
	// BootTime is when this machine started; import-backup refuses a
	// file last written before it. Zero: read from /proc/stat (btime);
	// if that cannot be read, nothing is refused.
	BootTime time.Time
	Logger   *slog.Logger
}

// ErrWrittenBeforeBoot: an import-backup file was last written before the
// machine started, so its bytes may have been lost with the page cache.
var ErrWrittenBeforeBoot = errors.New("backup file was written before this machine started")

// Service imports into one store.
type Service struct {
	opts Options
	log  *slog.Logger
}

// New returns the service; Store, Layers, Images and Uploads are required.
func New(opts Options) (*Service, error) {
	if opts.Store == nil || opts.Layers == nil || opts.Images == nil || opts.Uploads == nil {
		return nil, errors.New("ingest: Store, Layers, Images and Uploads are required")
	}
	if opts.HTTPClient == nil {
		opts.HTTPClient = &http.Client{Transport: &http.Transport{
			Proxy:                 http.ProxyFromEnvironment,
			ResponseHeaderTimeout: time.Minute,
			IdleConnTimeout:       90 * time.Second,
		}}
	}
	if opts.Resume.Attempts == 0 {
		opts.Resume = retry.Policy{Attempts: 5, Initial: 200 * time.Millisecond, Max: 2 * time.Second, Jitter: 0.2}
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opts.BootTime.IsZero() {
		if bt, err := readBootTime(); err == nil {
			opts.BootTime = bt
		} else {
			log.Warn("boot time unknown: import-backup will not refuse files written before a restart", "err", err)
		}
	}
	return &Service{opts: opts, log: log}, nil
}

func (s *Service) bootTime() time.Time { return s.opts.BootTime }

// readBootTime reads the kernel's boot time (btime, whole seconds) from
// /proc/stat.
func readBootTime() (time.Time, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return time.Time{}, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "btime "); ok {
			sec, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil || sec <= 0 {
				return time.Time{}, fmt.Errorf("/proc/stat: btime %q", v)
			}
			return time.Unix(sec, 0), nil
		}
	}
	return time.Time{}, errors.New("/proc/stat has no btime")
}

// commit runs layer.Commit, telling apart the errors of the ingest
// (before the new blob is verified: wrapped with ingestErr's context) from
// those of the verification and the record (returned as they are), and
// counting the ingested bytes once the blob is verified.
func (s *Service) commit(ctx context.Context, spec layer.Spec, ingested int64, ingestErr func(error) error) (blobstore.Image, error) {
	verified := false
	verify := spec.Verify
	spec.Verify = func(ctx context.Context, l layer.Layer) error {
		verified = true
		if verify != nil {
			if err := verify(ctx, l); err != nil {
				return err
			}
		}
		s.ingested(ingested)
		return nil
	}
	img, err := s.opts.Layers.Commit(ctx, spec)
	if err != nil && !verified {
		return img, ingestErr(err)
	}
	return img, err
}

// ingested counts n bytes read into the store.
func (s *Service) ingested(n int64) {
	if s.opts.Ingested != nil {
		s.opts.Ingested.Add(float64(n))
	}
}

const qcow2Magic = "QFI\xfb"

// sniffFormat names a file's format from its first bytes.
func sniffFormat(head []byte) string {
	switch {
	case len(head) >= 4 && string(head[:4]) == qcow2Magic:
		return "qcow2"
	case len(head) >= 2 && head[0] == 0x1f && head[1] == 0x8b:
		return "gzip"
	case len(head) >= 4 && head[0] == 0x28 && head[1] == 0xb5 && head[2] == 0x2f && head[3] == 0xfd:
		return "zstd"
	}
	return "raw"
}

// isoMagic is the standard identifier of an ISO-9660 volume descriptor;
// the first descriptor starts at 32 KiB (sector 16), after its type byte.
const (
	isoMagic       = "CD001"
	isoMagicOffset = 32<<10 + 1
)

// isISO reports whether r holds an ISO-9660 volume descriptor at 32 KiB.
func isISO(r io.ReaderAt) bool {
	b := make([]byte, len(isoMagic))
	n, _ := r.ReadAt(b, isoMagicOffset)
	return n == len(b) && string(b) == isoMagic
}

// sniff reads the first bytes of r and names their format.
func sniff(r io.ReaderAt) string {
	head := make([]byte, 8)
	n, _ := r.ReadAt(head, 0)
	return sniffFormat(head[:n])
}

func firstNonEmpty(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}
