// Package rgwtest runs a real single-node Ceph cluster with the RADOS Gateway
// (S3) on loopback, for tests: Debian's ceph-mon, ceph-mgr, one ceph-osd and
// radosgw, started by hand (no systemd), every file (ceph.conf, keyrings,
// sockets, logs, data) under one directory, every port chosen free at start so
// that several test processes can each run their own cluster at once.
//
// A test package keeps one cluster for the whole process (bring-up takes
// 20 s on a calm machine, minutes on a busy one):
//
//	var rgw rgwtest.Shared
//
//	func TestMain(m *testing.M) { os.Exit(rgw.Run(m)) }
//
//	func TestX(t *testing.T) {
//		c := rgw.Get(t)          // started on first use; fails the test if it cannot start
//		bucket := c.TestBucket(t) // a fresh bucket for this test
//		...
//	}
//
// The OSD keeps objects in RAM (memstore, 4 GiB by default): keep test
// objects small, and run GC after deleting many. Buckets live until the
// cluster closes. A cluster costs about 0.5 GB of RAM (ceph-mgr 200-300 MB)
// and 40 MB of disk (the mon's store).
//
// Daemons are our children (foreground, SIGKILL as parent-death signal): a
// test binary that dies leaves no daemon behind, only its directory under
// $TMPDIR. Set IMAGESTORE_TEST_RGW_KEEP=1 to keep the cluster's directory
// (ceph.conf and every daemon's log) after the tests; its path is printed on
// stderr.
package rgwtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// KeepEnv names the environment variable that, set to 1, keeps the cluster's
// directory (ceph.conf and every log) when the cluster is closed.
const KeepEnv = "IMAGESTORE_TEST_RGW_KEEP"

// Region is the S3 region the cluster answers to (RGW accepts any; the
// backend's tests use this one).
const Region = "us-east-1"

// errPortTaken marks a daemon that exited because its port was taken
// (EADDRINUSE, exit status 98). Its text says so itself: a daemon that
// exits at once may not have flushed its log's bind error.
var errPortTaken = errors.New("port taken (bind: address already in use)")

// Options configure Start. The zero value is what tests want.
type Options struct {
	// Store is the OSD's object store: "memstore" (default) or "bluestore".
	// Memstore keeps objects in RAM (capped by StoreBytes): no disk I/O and
	// no fsync on a loaded CI disk, and nothing left on disk after Close.
	// It survives RestartOSD (the OSD saves it on a clean shutdown) but not a
	// SIGKILL of the OSD. Bluestore writes a sparse file of StoreBytes that
	// never shrinks.
	Store string
	// StoreBytes caps the store; default 4 GiB.
	StoreBytes int64
	// Timeout bounds the whole bring-up; default 8 minutes (a busy 2-core
	// machine took 6).
	Timeout time.Duration
	// Logf, if set, receives one line per bring-up step with its time.
	Logf func(format string, args ...any)
}

// Cluster is a running single-node Ceph cluster with one radosgw.
type Cluster struct {
	Endpoint  string // http://127.0.0.1:port, the S3 endpoint
	AccessKey string // the S3 user's credentials
	SecretKey string
	Region    string // always Region
	Dir       string // everything the cluster writes lives here

	opts    Options
	conf    string // Dir/ceph.conf
	rgwAddr string // 127.0.0.1:port
	osdID   string

	mu          sync.Mutex
	daemons     map[string]*daemon // by Ceph name: mon.a, mgr.x, osd.0, client.rgw.a
	tlsEndpoint string             // the HTTPS gateway's, once StartTLS ran
	spawn       chan spawnReq      // to the thread that starts daemons
	closed      bool
}

// The Ceph names of the daemons.
const (
	monName = "mon.a"
	mgrName = "mgr.x"
	rgwName = "client.rgw.a"
)

// Start brings a cluster up under dir (created if missing; it must be short:
// admin sockets live under it and a unix socket path has 107 bytes) and
// returns once the S3 user can list its buckets. On error everything started
// is stopped; the error names the step and quotes the tail of its log.
func Start(ctx context.Context, dir string, opts Options) (*Cluster, error) {
	if opts.Store == "" {
		opts.Store = "memstore"
	}
	if opts.StoreBytes == 0 {
		opts.StoreBytes = 4 << 30
	}
	if opts.Timeout == 0 {
		opts.Timeout = 8 * time.Minute
	}
	// Ceph ignores an unknown object store (it falls back to bluestore).
	if opts.Store != "memstore" && opts.Store != "bluestore" {
		return nil, fmt.Errorf("rgwtest: unknown object store %q (memstore or bluestore)", opts.Store)
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if n := len(filepath.Join(dir, "run", rgwName+".asok")); n > 107 {
		return nil, fmt.Errorf("rgwtest: directory %s too long for admin sockets (%d bytes > 107)", dir, n)
	}
	for _, bin := range []string{"ceph-mon", "ceph-mgr", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "ceph-authtool", "monmaptool"} {
		if _, err := lookPath(bin); err != nil {
			return nil, fmt.Errorf("rgwtest: %s not installed (.ci/deps installs ceph-mon ceph-osd ceph-mgr radosgw): %w", bin, err)
		}
	}
	c := &Cluster{
		Region: Region,
		Dir:    dir,
		opts:   opts,
		conf:   filepath.Join(dir, "ceph.conf"),
	}
	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()
	// Ports are free when picked but another process may bind one before our
	// daemon does: then the daemon exits saying so, and we start over.
	for attempt := 1; ; attempt++ {
		err := c.bringUp(ctx)
		if err == nil {
			break
		}
		c.stopAll(false)
		if attempt < 3 && ctx.Err() == nil && errors.Is(err, errPortTaken) {
			if c.opts.Logf != nil {
				c.opts.Logf("rgwtest: a port was taken, starting over: %v", err)
			}
			continue
		}
		return nil, fmt.Errorf("rgwtest: bring-up in %s: %w", dir, err)
	}
	return c, nil
}

func (c *Cluster) logf(start time.Time, format string, args ...any) {
	if c.opts.Logf != nil {
		c.opts.Logf("rgwtest: %6.1fs "+format, append([]any{time.Since(start).Seconds()}, args...)...)
	}
}

// bringUp starts a cluster in an emptied Dir.
func (c *Cluster) bringUp(ctx context.Context) error {
	start := time.Now()
	if err := c.resetDir(); err != nil {
		return err
	}
	ports, err := freePorts(3)
	if err != nil {
		return err
	}
	monAddrs := fmt.Sprintf("[v2:127.0.0.1:%d,v1:127.0.0.1:%d]", ports[0], ports[1])
	c.rgwAddr = "127.0.0.1:" + strconv.Itoa(ports[2])
	c.Endpoint = "http://" + c.rgwAddr
	fsid := uuid()
	if err := os.WriteFile(c.conf, []byte(c.config(fsid, monAddrs)), 0o600); err != nil {
		return err
	}

	// Every key is made up front and imported into the mon's keyring, so the
	// mon knows mgr.x and client.rgw.a (with their caps) from mkfs on.
	monKeyring := c.path("mon.keyring")
	keys := []struct {
		name string
		caps []string
	}{
		{"mon.", []string{"mon", "allow *"}},
		{"client.admin", []string{"mon", "allow *", "osd", "allow *", "mgr", "allow *", "mds", "allow *"}},
		{mgrName, []string{"mon", "allow profile mgr", "osd", "allow *", "mds", "allow *"}},
		{rgwName, []string{"mon", "allow rw", "osd", "allow rwx", "mgr", "allow rw"}},
	}
	for _, k := range keys {
		file := c.path(strings.TrimSuffix(k.name, ".") + ".keyring")
		args := []string{"--create-keyring", file, "--gen-key", "-n", k.name}
		for i := 0; i < len(k.caps); i += 2 {
			args = append(args, "--cap", k.caps[i], k.caps[i+1])
		}
		if _, err := c.run(ctx, "", "ceph-authtool", args...); err != nil {
			return err
		}
		if k.name != "mon." {
			if _, err := c.run(ctx, "", "ceph-authtool", monKeyring, "--import-keyring", file); err != nil {
				return err
			}
		}
	}
	if _, err := c.run(ctx, "", "monmaptool", "--create", "--addv", "a", monAddrs, "--fsid", fsid, c.path("monmap")); err != nil {
		return err
	}
	if _, err := c.run(ctx, monName, "ceph-mon", "-c", c.conf, "--mkfs", "-i", "a", "--monmap", c.path("monmap"), "--keyring", monKeyring); err != nil {
		return err
	}
	if err := c.startDaemon(monName, "ceph-mon", "-i", "a"); err != nil {
		return err
	}
	c.logf(start, "mon started on %s", monAddrs)
	if err := c.startDaemon(mgrName, "ceph-mgr", "-i", "x"); err != nil {
		return err
	}
	c.logf(start, "mgr started")

	// The OSD: registered with its key in one call (the mon answers it once
	// it has formed its quorum of one), then mkfs, then run.
	osdUUID := uuid()
	secret, err := c.run(ctx, "", "ceph-authtool", "--gen-print-key")
	if err != nil {
		return err
	}
	secret = bytes.TrimSpace(secret)
	newJSON := c.path("osd-new.json")
	if err := os.WriteFile(newJSON, fmt.Appendf(nil, `{"cephx_secret": %q}`, secret), 0o600); err != nil {
		return err
	}
	var id []byte
	err = c.waitFor(ctx, "the mon to register the OSD", monName, func(ctx context.Context) error {
		var err error
		id, err = c.ceph(ctx, "osd", "new", osdUUID, "-i", newJSON)
		return err
	})
	if err != nil {
		return err
	}
	c.osdID = strings.TrimSpace(string(id))
	if _, err := strconv.Atoi(c.osdID); err != nil {
		return fmt.Errorf("ceph osd new answered %q, not an OSD id", id)
	}
	osdName := "osd." + c.osdID
	osdData := c.path("osd", "ceph-"+c.osdID)
	if err := os.MkdirAll(osdData, 0o700); err != nil {
		return err
	}
	keyring := fmt.Appendf(nil, "[%s]\n\tkey = %s\n", osdName, secret)
	for _, p := range []string{c.path(osdName + ".keyring"), filepath.Join(osdData, "keyring")} {
		if err := os.WriteFile(p, keyring, 0o600); err != nil {
			return err
		}
	}
	c.logf(start, "%s registered", osdName)
	if _, err := c.run(ctx, osdName, "ceph-osd", "-c", c.conf, "-i", c.osdID, "--mkfs", "--osd-uuid", osdUUID); err != nil {
		return err
	}
	c.logf(start, "%s mkfs done (%s)", osdName, c.opts.Store)
	if err := c.startOSD(ctx); err != nil {
		return err
	}
	c.logf(start, "%s up", osdName)

	if err := c.startRGW(ctx); err != nil {
		return err
	}
	c.logf(start, "radosgw answers on %s", c.Endpoint)
	c.AccessKey, c.SecretKey = randomKey(20, "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"), randomKey(40, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
	err = c.waitFor(ctx, "radosgw-admin to create the S3 user", rgwName, func(ctx context.Context) error {
		_, err := c.run(ctx, "client.admin", "radosgw-admin", "-c", c.conf, "user", "create", "--uid=test", "--display-name=test",
			"--access-key="+c.AccessKey, "--secret="+c.SecretKey)
		if err != nil && strings.Contains(err.Error(), "already exists") {
			return nil // an earlier attempt timed out on our side but went through
		}
		return err
	})
	if err != nil {
		return err
	}
	if err := c.waitS3(ctx); err != nil {
		return err
	}
	c.logf(start, "S3 user can list buckets")
	return nil
}

// resetDir empties Dir (it may hold a failed attempt) and makes the tree the
// daemons expect; it also makes a new spawner, as stopAll ends the old one.
func (c *Cluster) resetDir() error {
	ents, err := os.ReadDir(c.Dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	for _, e := range ents {
		if err := os.RemoveAll(c.path(e.Name())); err != nil {
			return err
		}
	}
	for _, d := range []string{"run", "log", "crash", "mon/ceph-a", "mgr/ceph-x", "rgw", "osd"} {
		if err := os.MkdirAll(c.path(d), 0o700); err != nil {
			return err
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.daemons = map[string]*daemon{}
	c.closed = false
	c.spawn = newSpawner()
	return nil
}

// config is ceph.conf: a size-1 cluster on loopback, everything under Dir.
func (c *Cluster) config(fsid, monAddrs string) string {
	D := c.Dir
	return fmt.Sprintf(`[global]
fsid = %[1]s
mon host = %[2]s
mon initial members = a
public network = 127.0.0.0/8
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = %[3]s/$name.keyring
run dir = %[3]s/run
admin socket = %[3]s/run/$name.asok
pid file = %[3]s/run/$name.pid
log file = %[3]s/log/$name.log
crash dir = %[3]s/crash
mon cluster log file = %[3]s/log/$cluster.$channel.log
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
mon allow pool delete = true
osd crush chooseleaf type = 0
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
# A nearly full CI disk must not stop the mon (default: shut down below 5 %% free).
mon data avail crit = 1
[mon]
mon data = %[3]s/mon/$cluster-$id
keyring = %[3]s/mon/$cluster-$id/keyring
[mgr]
mgr data = %[3]s/mgr/$cluster-$id
mgr initial modules =
[osd]
osd data = %[3]s/osd/$cluster-$id
osd objectstore = %[4]s
# A clean shutdown (SIGTERM) umounts the store: memstore saves its objects.
osd fast shutdown = false
osd memory target = 1073741824
memstore device bytes = %[5]d
bluestore block path = %[3]s/osd/$cluster-$id/block.file
bluestore block create = true
bluestore block size = %[5]d
bluestore fsck on mount = false
[%[6]s]
rgw data = %[3]s/rgw
rgw frontends = beast endpoint=%[7]s
# Deleted objects' space is reclaimable by GC at once (default: after 2 h).
rgw gc obj min wait = 0
# One radosgw needs no cache kept coherent with others: without the cache it
# keeps no watch on its notify objects, so after a SIGKILL of radosgw the next
# metadata write (a new bucket) does not wait 30 s for the dead one's watch
# to time out.
rgw cache enabled = false
`, fsid, monAddrs, D, c.opts.Store, c.opts.StoreBytes, rgwName, c.rgwAddr)
}

func (c *Cluster) path(elem ...string) string {
	return filepath.Join(append([]string{c.Dir}, elem...)...)
}

// Client is an S3 client for the cluster's user, configured as the backend
// configures its own against RGW 16.2: path-style, static credentials,
// checksums only when an operation requires them (RGW rejects the SDK's
// default aws-chunked trailing checksum). Bodies must be seekable over
// plain http (SigV4 hashes the payload).
func (c *Cluster) Client() *s3.Client {
	return s3.New(s3.Options{
		BaseEndpoint:               aws.String(c.Endpoint),
		Region:                     c.Region,
		UsePathStyle:               true,
		Credentials:                credentials.NewStaticCredentialsProvider(c.AccessKey, c.SecretKey, ""),
		RequestChecksumCalculation: aws.RequestChecksumCalculationWhenRequired,
		ResponseChecksumValidation: aws.ResponseChecksumValidationWhenRequired,
	})
}

// NewBucket creates the bucket name.
func (c *Cluster) NewBucket(ctx context.Context, name string) error {
	if _, err := c.Client().CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String(name)}); err != nil {
		return fmt.Errorf("rgwtest: creating bucket %s: %w", name, err)
	}
	return nil
}

// GC runs RGW's garbage collector now over every deleted object, so that
// their space is free (RGW otherwise frees it in its periodic GC).
func (c *Cluster) GC(ctx context.Context) error {
	_, err := c.run(ctx, "client.admin", "radosgw-admin", "-c", c.conf, "gc", "process", "--include-all")
	return err
}

// KillRGW kills radosgw with SIGKILL (a crash) and waits for it to exit.
func (c *Cluster) KillRGW() error {
	return c.stop(rgwName, syscall.SIGKILL, 0)
}

// StartRGW starts radosgw again after KillRGW and waits until its S3 user can
// list buckets.
func (c *Cluster) StartRGW(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
	defer cancel()
	if err := c.startRGW(ctx); err != nil {
		return fmt.Errorf("rgwtest: %w", err)
	}
	if err := c.waitS3(ctx); err != nil {
		return fmt.Errorf("rgwtest: %w", err)
	}
	return nil
}

// RestartRGW kills radosgw (SIGKILL) and starts it again.
func (c *Cluster) RestartRGW(ctx context.Context) error {
	if err := c.KillRGW(); err != nil {
		return err
	}
	return c.StartRGW(ctx)
}

// RestartOSD stops the OSD with SIGTERM (a clean shutdown: memstore saves its
// objects then), starts it again and waits until S3 answers.
func (c *Cluster) RestartOSD(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
	defer cancel()
	if err := c.restartOSD(ctx); err != nil {
		return err
	}
	if err := c.waitS3(ctx); err != nil {
		return fmt.Errorf("rgwtest: %w", err)
	}
	return nil
}

func (c *Cluster) restartOSD(ctx context.Context) error {
	if err := c.stop("osd."+c.osdID, syscall.SIGTERM, 2*time.Minute); err != nil {
		return err
	}
	if err := c.startOSD(ctx); err != nil {
		return fmt.Errorf("rgwtest: %w", err)
	}
	return nil
}

// Restart restarts the object store's servers as a server restart under a
// client would: radosgw killed (SIGKILL), the OSD stopped cleanly, then both
// started again; it returns once S3 answers.
func (c *Cluster) Restart(ctx context.Context) error {
	if err := c.KillRGW(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
	defer cancel()
	if err := c.restartOSD(ctx); err != nil {
		return err
	}
	return c.StartRGW(ctx)
}

// Close stops every daemon (SIGKILL; with IMAGESTORE_TEST_RGW_KEEP=1 SIGTERM
// first so the logs are complete) and removes Dir unless that variable is
// set.
func (c *Cluster) Close() error {
	keep := os.Getenv(KeepEnv) == "1"
	c.stopAll(keep)
	if keep {
		fmt.Fprintf(os.Stderr, "rgwtest: %s=1: kept %s\n", KeepEnv, c.Dir)
		return nil
	}
	return os.RemoveAll(c.Dir)
}

// waitS3 waits until the S3 user can list its buckets: radosgw serves, the
// OSD's placement groups are active and the user is known.
func (c *Cluster) waitS3(ctx context.Context) error {
	cli := c.Client()
	return c.waitFor(ctx, "S3 ListBuckets to succeed at "+c.Endpoint, rgwName, func(ctx context.Context) error {
		_, err := cli.ListBuckets(ctx, &s3.ListBucketsInput{})
		return err
	})
}

func (c *Cluster) startOSD(ctx context.Context) error {
	name := "osd." + c.osdID
	if err := c.startDaemon(name, "ceph-osd", "-i", c.osdID); err != nil {
		return err
	}
	return c.waitFor(ctx, name+" to be up", name, func(ctx context.Context) error {
		out, err := c.ceph(ctx, "osd", "stat", "-f", "json")
		if err != nil {
			return err
		}
		var st struct {
			NumUpOSDs int `json:"num_up_osds"`
		}
		if err := json.Unmarshal(out, &st); err != nil {
			return fmt.Errorf("ceph osd stat: %w: %s", err, out)
		}
		if st.NumUpOSDs != 1 {
			return fmt.Errorf("%d OSDs up: %s", st.NumUpOSDs, bytes.TrimSpace(out))
		}
		return nil
	})
}

func (c *Cluster) startRGW(ctx context.Context) error {
	if err := c.startDaemon(rgwName, "radosgw", "-n", rgwName); err != nil {
		return err
	}
	hc := &http.Client{Timeout: 10 * time.Second}
	return c.waitFor(ctx, "radosgw to answer HTTP on "+c.rgwAddr, rgwName, answers(hc, c.Endpoint+"/"))
}

// answers is a waitFor check: a GET of url gets an HTTP answer, any status.
func answers(hc *http.Client, url string) func(context.Context) error {
	return func(ctx context.Context) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := hc.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		return nil
	}
}

// ceph runs the ceph CLI as client.admin, bounded so that a mon that does not
// answer costs one attempt, not the CLI's own five minutes.
func (c *Cluster) ceph(ctx context.Context, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	return c.run(ctx, "client.admin", "ceph", append([]string{"-c", c.conf, "--connect-timeout", "30"}, args...)...)
}

// run runs a command to completion. Its error carries the command's output
// and, if logName is set, the tail of that Ceph name's log file.
func (c *Cluster) run(ctx context.Context, logName, bin string, args ...string) ([]byte, error) {
	path, err := lookPath(bin)
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = append(os.Environ(), "CEPH_CONF="+c.conf, "CEPH_ARGS=")
	cmd.WaitDelay = 5 * time.Second
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		msg := fmt.Sprintf("%s %s: %v", bin, strings.Join(redactArgs(args), " "), err)
		if s := strings.TrimSpace(stderr.String() + string(out)); s != "" {
			msg += "\n" + tail(s, 20)
		}
		if logName != "" {
			msg += c.logTail(logName)
		}
		return out, errors.New(msg)
	}
	return out, nil
}

// redactArgs hides the S3 secret from error messages.
func redactArgs(args []string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		if strings.HasPrefix(a, "--secret=") {
			a = "--secret=REDACTED"
		}
		out[i] = a
	}
	return out
}

// waitFor retries check (each try bounded by ctx) until it succeeds, the
// daemon named logName exits, or ctx ends. Its error names what it waited for,
// the last failure and the tail of the daemon's log.
func (c *Cluster) waitFor(ctx context.Context, what, logName string, check func(context.Context) error) error {
	start := time.Now()
	var last error
	for {
		if d := c.daemon(logName); d != nil {
			select {
			case <-d.done:
				out, log := d.outTail(), c.logTail(logName)
				err := fmt.Errorf("%s exited (%v) while waiting for %s%s%s", logName, d.err, what, out, log)
				var exit *exec.ExitError
				if (errors.As(d.err, &exit) && exit.ExitCode() == 98) || strings.Contains(out+log, "Address already in use") {
					err = fmt.Errorf("%w: %w", errPortTaken, err)
				}
				return err
			default:
			}
		}
		if last = check(ctx); last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("timed out after %s waiting for %s: last error: %v%s", time.Since(start).Round(time.Second), what, last, c.logTail(logName))
		case <-time.After(time.Second):
		}
	}
}

// logTail is the end of the log file of a Ceph name, to append to an error.
func (c *Cluster) logTail(name string) string {
	p := c.path("log", name+".log")
	b, err := readTail(p, 8<<10)
	if err != nil {
		return fmt.Sprintf("\n(no log %s: %v)", p, err)
	}
	return fmt.Sprintf("\n--- tail of %s ---\n%s", p, tail(string(b), 30))
}

func readTail(path string, n int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	off := max(st.Size()-n, 0)
	b := make([]byte, st.Size()-off)
	_, err = f.ReadAt(b, off)
	return b, err
}

// tail is the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// freePorts picks n distinct loopback ports that are free now, below the
// kernel's ephemeral range (so no outgoing connection takes one before the
// daemon binds it) and outside 6800-7300, where Ceph's OSDs and mgrs bind.
// Chosen at random, so two test processes starting at once rarely try the
// same port, and each is checked by binding it.
func freePorts(n int) ([]int, error) {
	lo, hi := 20000, 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if v, err := strconv.Atoi(f[0]); err == nil {
				hi = v
			}
		}
	}
	if hi-lo < 1000 {
		lo, hi = 10000, 65535 // an unusual ephemeral range: any port, checked
	}
	seen := map[int]bool{}
	var ports []int
	for try := 0; len(ports) < n; try++ {
		if try > 1000 {
			return nil, fmt.Errorf("no %d free loopback ports in [%d, %d)", n, lo, hi)
		}
		var b [2]byte
		_, _ = rand.Read(b[:])
		p := lo + (int(b[0])<<8|int(b[1]))%(hi-lo)
		if seen[p] || (p >= 6800 && p <= 7300) {
			continue
		}
		seen[p] = true
		ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			continue
		}
		ln.Close()
		ports = append(ports, p)
	}
	return ports, nil
}

func uuid() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func randomKey(n int, alphabet string) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b)
}

// lookPath finds a Ceph tool in PATH or /usr/bin, /usr/sbin (a test's PATH
// may lack sbin).
func lookPath(bin string) (string, error) {
	if p, err := exec.LookPath(bin); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/bin", "/usr/sbin"} {
		p := filepath.Join(d, bin)
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: not found in PATH, /usr/bin or /usr/sbin", bin)
}
