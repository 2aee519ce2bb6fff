package rgwtest

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// Shared is one cluster for a whole test process: started by the first Get,
// stopped by Run (or Close) once the tests are done. Its zero value is ready;
// a test package declares one as a package variable.
//
// Tests that restart or kill the cluster's daemons must not run in parallel
// with other tests of the same process.
type Shared struct {
	// Options are used by the first Get.
	Options Options

	mu      sync.Mutex
	started bool
	c       *Cluster
	err     error
}

// Get returns the process's cluster, starting it on first use under a new
// temporary directory. If the cluster cannot come up the test fails with the
// reason (then and in every later Get): a missing Ceph is an error, never a
// skip.
func (s *Shared) Get(t testing.TB) *Cluster {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.started {
		s.started = true
		s.c, s.err = s.start(t)
	}
	if s.err != nil {
		t.Fatalf("rgwtest: no cluster: %v", s.err)
	}
	return s.c
}

func (s *Shared) start(t testing.TB) (*Cluster, error) {
	dir, err := os.MkdirTemp("", "rgwtest-")
	if err != nil {
		return nil, err
	}
	opts := s.Options
	if opts.Logf == nil {
		opts.Logf = t.Logf
	}
	begin := time.Now()
	c, err := Start(context.Background(), dir, opts)
	if err != nil {
		if os.Getenv(KeepEnv) != "1" {
			_ = os.RemoveAll(dir)
		}
		return nil, err
	}
	c.opts.Logf = nil // t ends before the cluster does
	t.Logf("rgwtest: cluster up in %s at %s (%s)", time.Since(begin).Round(100*time.Millisecond), c.Endpoint, dir)
	return c, nil
}

// Run runs the tests, then closes the cluster if one was started; it returns
// m.Run's exit code, for os.Exit.
func (s *Shared) Run(m *testing.M) int {
	code := m.Run()
	if err := s.Close(); err != nil {
		fmt.Fprintf(os.Stderr, "rgwtest: closing the cluster: %v\n", err)
		if code == 0 {
			code = 1
		}
	}
	return code
}

// Close stops the cluster, if one was started.
func (s *Shared) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.c == nil {
		return nil
	}
	err := s.c.Close()
	s.c = nil
	return err
}

// TestBucket creates a bucket for the test t, named after it (S3 rules:
// lowercase letters, digits and hyphens, at most 63 characters) with a
// random suffix, and returns its name.
func (c *Cluster) TestBucket(t testing.TB) string {
	t.Helper()
	var b strings.Builder
	for _, r := range strings.ToLower(t.Name()) {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			b.WriteRune(r)
		default:
			if s := b.String(); s != "" && !strings.HasSuffix(s, "-") {
				b.WriteByte('-')
			}
		}
	}
	name := strings.Trim(b.String(), "-")
	if len(name) > 50 {
		name = strings.Trim(name[:50], "-")
	}
	if name == "" {
		name = "test"
	}
	name += "-" + randomKey(8, "abcdefghijklmnopqrstuvwxyz0123456789")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := c.NewBucket(ctx, name); err != nil {
		t.Fatal(err)
	}
	return name
}
