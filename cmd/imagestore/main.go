// Command imagestore is the host-side CLI of the image store (the cloud's
// zstcli role): push a volume or delta, pull a chain as one standalone
// image, list images, upload a file for the agent's upload:// import, and
// back up / restore MariaDB databases. See docs/cli.md.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"imagestore/transfer/oci"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// globals are the flags every command takes (before or after its name).
type globals struct {
	url      string
	agentURL string
	rootCA   string
	token    string
	json     bool
	quiet    bool

	stdout, stderr io.Writer
	// tty forces terminal-style progress (tests); nil = detect on stderr.
	tty *bool
}

func (g *globals) register(fs *flag.FlagSet) {
	fs.StringVar(&g.url, "url", g.url, "registry URL of the store (port 8000)")
	fs.StringVar(&g.agentURL, "agent-url", g.agentURL, "agent URL of the store (port 8001), for upload and pullfromhost")
	fs.StringVar(&g.rootCA, "rootca", g.rootCA, "PEM file of the CA that signed the store's certificate")
	fs.StringVar(&g.token, "token", g.token, "bearer token (default $IMAGESTORE_TOKEN)")
	fs.BoolVar(&g.json, "json", g.json, "print results as JSON")
	fs.BoolVar(&g.quiet, "quiet", g.quiet, "no progress output")
}

type command struct {
	name, usage string
	run         func(ctx context.Context, g *globals, args []string) error
}

// commands lists the verbs, in the order usage prints them.
func commands() []command {
	return []command{
		{"push", "push [-concurrency N] [-parent name:id] [-bwlimit B/s] [-name NAME] [-id ID] FILE", cmdPush},
		{"pull", "pull -installpath DST [-format qcow2|raw] [-bwlimit B/s] name:id", cmdPull},
		{"info", "info name:id", cmdInfo},
		{"images", "images -name NAME", cmdImages},
		{"upload", "upload -task TASKUUID [-bwlimit B/s] FILE", cmdUpload},
		{"pullfromhost", "pullfromhost -host H [-port N] -user U (-key-file F | -password-file F) [-fingerprint SHA256:...] -path P [-parent name:id] [-name N] [-volume-bwlimit B/s] [-network-bwlimit B/s] [-parallelism N]", cmdPullFromHost},
		{"db", "db backup|restore ...", cmdDB},
	}
}

// errUsage marks bad command lines (exit 2).
var errUsage = errors.New("usage")

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: imagestore [-url URL] [-agent-url URL] [-rootca PEM] [-token T] [-json] [-quiet] COMMAND ...")
	for _, c := range commands() {
		fmt.Fprintln(w, "  imagestore", c.usage)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	g := &globals{url: "http://127.0.0.1:8000", agentURL: "http://127.0.0.1:8001", token: os.Getenv("IMAGESTORE_TOKEN"), stdout: stdout, stderr: stderr}
	fs := flag.NewFlagSet("imagestore", flag.ContinueOnError)
	fs.SetOutput(stderr)
	g.register(fs)
	fs.Usage = func() { usage(stderr) }
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() == 0 {
		usage(stderr)
		return 2
	}
	name, rest := fs.Arg(0), fs.Args()[1:]
	for _, c := range commands() {
		if c.name != name {
			continue
		}
		err := c.run(ctx, g, rest)
		switch {
		case err == nil:
			return 0
		case errors.Is(err, flag.ErrHelp):
			return 0
		case errors.Is(err, errUsage):
			fmt.Fprintln(stderr, "imagestore:", err)
			return 2
		default:
			fmt.Fprintln(stderr, "imagestore "+name+":", explain(err))
			return 1
		}
	}
	fmt.Fprintf(stderr, "imagestore: unknown command %q\n", name)
	usage(stderr)
	return 2
}

// explain adds a hint to errors an operator can act on.
func explain(err error) string {
	msg := err.Error()
	switch {
	case errors.Is(err, oci.ErrUnauthorized):
		return msg + " (authentication failed: check -token or $IMAGESTORE_TOKEN)"
	case errors.Is(err, oci.ErrNotFound):
		return msg + " (no such image or blob on the store)"
	case errors.Is(err, oci.ErrQuota):
		return msg + " (the store is full or over its quota)"
	}
	return msg
}

// subFlags builds a command's flag set; the globals may be repeated after
// the command name.
func (g *globals) subFlags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet("imagestore "+name, flag.ContinueOnError)
	fs.SetOutput(g.stderr)
	g.register(fs)
	return fs
}

// parseArgs parses flags that may come before or after positional
// arguments ("push FILE -json" works like "push -json FILE").
func parseArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return pos, nil
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

func (g *globals) client() (*oci.Client, error) {
	opts := oci.Options{Addr: g.url, Token: g.token, Compress: true}
	if g.rootCA != "" {
		b, err := os.ReadFile(g.rootCA)
		if err != nil {
			return nil, fmt.Errorf("-rootca: %w", err)
		}
		opts.CA = b
	}
	return oci.New(opts)
}

// connect returns a client that has reached the store: commands that are
// about to do expensive local work (normalize a disk, run a dump) fail
// first on a wrong -url, -token or -rootca. Close its idle connections.
func (g *globals) connect(ctx context.Context) (*oci.Client, error) {
	c, err := g.client()
	if err != nil {
		return nil, err
	}
	if err := c.Ping(ctx); err != nil {
		c.CloseIdleConnections()
		return nil, fmt.Errorf("store %s: %w", g.url, err)
	}
	return c, nil
}

// printResult writes v as JSON with -json, else as "key: value" lines.
func (g *globals) printResult(v any, text func(w io.Writer)) error {
	if g.json {
		enc := json.NewEncoder(g.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	text(g.stdout)
	return nil
}

func usageErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, args...))
}

// parseBytes reads "10485760", "10M", "1.5GiB" (binary units).
func parseBytes(s string) (int64, error) {
	s = strings.TrimSpace(s)
	if s == "" || s == "0" {
		return 0, nil
	}
	mult := int64(1)
	low := strings.ToLower(s)
	for _, u := range []struct {
		suf string
		m   int64
	}{{"kib", 1 << 10}, {"mib", 1 << 20}, {"gib", 1 << 30}, {"tib", 1 << 40}, {"kb", 1 << 10}, {"mb", 1 << 20}, {"gb", 1 << 30}, {"tb", 1 << 40}, {"k", 1 << 10}, {"m", 1 << 20}, {"g", 1 << 30}, {"t", 1 << 40}, {"b", 1}} {
		if strings.HasSuffix(low, u.suf) {
			mult = u.m
			low = strings.TrimSpace(strings.TrimSuffix(low, u.suf))
			break
		}
	}
	f, err := strconv.ParseFloat(low, 64)
	if err != nil || !(f >= 0) { // also refuses NaN
		return 0, fmt.Errorf("bad byte size %q", s)
	}
	v := f * float64(mult)
	if v > 1<<62 {
		return 0, fmt.Errorf("byte size %q too large", s)
	}
	return int64(v), nil
}

// byteFlag is a flag.Value holding a byte size.
type byteFlag struct{ v int64 }

func (b *byteFlag) String() string { return fmt.Sprint(b.v) }
func (b *byteFlag) Set(s string) error {
	v, err := parseBytes(s)
	if err != nil {
		return err
	}
	b.v = v
	return nil
}
