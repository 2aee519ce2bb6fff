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
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"imagestore/internal/tlsconf"
	"imagestore/internal/version"
	"imagestore/transfer/oci"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := run(ctx, faceOf(os.Args[0]), os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// face is how the binary was called: as our own CLI, or as the cloud's
// host client (a file or symlink named zstcli), whose argument vectors and
// output are fixed by the callers (docs/zstcli.md).
type face int

const (
	faceImagestore face = 1 << iota
	faceZstcli
	faceBoth = faceImagestore | faceZstcli
)

func (f face) String() string {
	if f == faceZstcli {
		return "zstcli"
	}
	return "imagestore"
}

// faceOf picks the face from the program's file name.
func faceOf(argv0 string) face {
	if strings.HasPrefix(filepath.Base(argv0), "zstcli") {
		return faceZstcli
	}
	return faceImagestore
}

// globals are the flags every command takes (before or after its name).
type globals struct {
	face       face
	url        string
	agentURL   string
	rootCA     string
	serverName string // name the store's certificate must carry; "" = the dialled host
	token      string
	json       bool
	quiet      bool
	version    bool

	// The cloud's host-client flags (zstcli face).
	callbackURL string // accepted; no final result is ever posted to it
	taskID      string
	imageUUID   string // add's namespace
	cacheDir    string // accepted (-cachedir); see pull
	progressTo  string // -progress FILE: integer percentages, one per line
	stage       stageFlag
	pct         *pctFile

	stdout, stderr io.Writer
	// tty forces terminal-style progress (tests); nil = detect on stderr.
	tty *bool
	// stateDir holds the host-local index of add (default hostStateDir).
	stateDir string
	// onLivePct, when set, also receives the live-backup engine's percentages.
	onLivePct func(int)
}

func (g *globals) register(fs *flag.FlagSet) {
	fs.StringVar(&g.url, "url", g.url, "registry address of the store (port 8000): host:port or a URL (default $IMAGESTORE_URL)")
	fs.StringVar(&g.rootCA, "rootca", g.rootCA, "PEM file of the CA that signed the store's certificate (https)")
	fs.StringVar(&g.token, "token", g.token, "bearer token (default $IMAGESTORE_TOKEN)")
	fs.BoolVar(&g.json, "json", g.json, "print results as JSON")
	if g.face == faceZstcli {
		fs.StringVar(&g.callbackURL, "callbackurl", g.callbackURL, "the caller's callback URL (accepted; nothing is posted to it)")
		fs.StringVar(&g.taskID, "taskid", g.taskID, "the caller's task id (accepted)")
		fs.StringVar(&g.imageUUID, "imageUuid", g.imageUUID, "image uuid: the name add gives the image")
		fs.StringVar(&g.cacheDir, "cachedir", g.cacheDir, "host-side cache directory (accepted)")
		fs.StringVar(&g.progressTo, "progress", g.progressTo, "append integer percentages to FILE, one per line")
		fs.Var(&g.stage, "stage", "scale percentages into A-B (e.g. 10-90)")
		return
	}
	fs.StringVar(&g.agentURL, "agent-url", g.agentURL, "agent URL of the store (port 8001), for upload, pullfromhost, db (default $IMAGESTORE_AGENT_URL)")
	fs.StringVar(&g.serverName, "tls-server-name", g.serverName, "name the store's certificate must carry (default: the host of -url)")
	fs.BoolVar(&g.quiet, "quiet", g.quiet, "no progress output")
}

type command struct {
	name, usage string
	run         func(ctx context.Context, g *globals, args []string) error
	faces       face // the faces that offer the verb
}

// commands lists the verbs, in the order usage prints them: one entry per verb.
func commands() []command {
	return append([]command{
		{"add", "add [-desc D] -file FILE", cmdAdd, faceZstcli},
		{"push", "push [-concurrency N] [-parent name:id] [-bwlimit B/s] [-name NAME] [-id ID] FILE", cmdPush, faceBoth},
		{"pull", "pull -installpath DST [-format qcow2|raw] [-bwlimit B/s] name:id", cmdPull, faceBoth},
		{"info", "info name:id", cmdInfo, faceBoth},
		{"images", "images [-name NAME]", cmdImages, faceBoth},
		{"list", "list", cmdList, faceZstcli},
		{"delete", "delete name:id", cmdDelete, faceImagestore},
		{"upload", "upload -task TASKUUID [-bwlimit B/s] FILE", cmdUpload, faceImagestore},
		{"pullfromhost", "pullfromhost -host H [-port N] -user U (-key-file F | -password-file F) [-fingerprint SHA256:...] -path P [-parent name:id] [-name N] [-volume-bwlimit B/s] [-network-bwlimit B/s] [-parallelism N]", cmdPullFromHost, faceImagestore},
		{"db", "db backup|restore ...", cmdDB, faceImagestore},
		{"completion", "completion bash", cmdCompletion, faceImagestore},
	}, liveCommands()...)
}

// commandsOf is the verbs face offers.
func commandsOf(f face) []command {
	var out []command
	for _, c := range commands() {
		if c.faces&f != 0 {
			out = append(out, c)
		}
	}
	return out
}

// errUsage marks bad command lines (exit 2).
var errUsage = errors.New("usage")

func usage(w io.Writer, f face) {
	if f == faceZstcli {
		fmt.Fprintln(w, "usage: zstcli [-rootca PEM] [-url HOST:PORT] [-json] [-progress FILE] [-stage A-B] [-imageUuid U] [-callbackurl URL] [-taskid ID] [-cachedir DIR] COMMAND ...")
	} else {
		fmt.Fprintln(w, "usage: imagestore [-url URL] [-agent-url URL] [-rootca PEM] [-token T] [-json] [-quiet] [-version] COMMAND ...")
	}
	for _, c := range commandsOf(f) {
		fmt.Fprintln(w, " ", f.String(), c.usage)
	}
}

// newGlobals holds the defaults of face, the environment's included.
func newGlobals(f face, stdout, stderr io.Writer) *globals {
	g := &globals{face: f, url: "http://127.0.0.1:8000", agentURL: "http://127.0.0.1:8001",
		token: os.Getenv("IMAGESTORE_TOKEN"), stdout: stdout, stderr: stderr, stateDir: hostStateDir()}
	if f == faceZstcli {
		// The cloud names the store as host:port; -rootca decides https.
		g.url = "127.0.0.1:8000"
		g.serverName = tlsconf.DefaultServerName
		g.quiet = true // stderr is the caller's error message
	}
	if v := os.Getenv("IMAGESTORE_URL"); v != "" {
		g.url = v
	}
	if v := os.Getenv("IMAGESTORE_AGENT_URL"); v != "" {
		g.agentURL = v
	}
	return g
}

// run is the whole program: parse, dispatch, map the outcome to an exit
// code (0 success, 1 failure with a message on stderr, 2 bad command line).
func run(ctx context.Context, f face, args []string, stdout, stderr io.Writer) int {
	g := newGlobals(f, stdout, stderr)
	prog := f.String()
	fs := flag.NewFlagSet(prog, flag.ContinueOnError)
	fs.SetOutput(stderr)
	g.register(fs)
	fs.BoolVar(&g.version, "version", false, "print the version and exit")
	fs.Usage = func() {
		usage(stderr, f)
		fs.PrintDefaults()
	}
	if err := parseFlags(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if g.version {
		fmt.Fprintln(stdout, "imagestore", version.String())
		return 0
	}
	if fs.NArg() == 0 {
		usage(stderr, f)
		return 2
	}
	name, rest := fs.Arg(0), fs.Args()[1:]
	for _, c := range commandsOf(f) {
		if c.name != name {
			continue
		}
		err := g.start()
		if err == nil {
			err = c.run(ctx, g, rest)
		}
		if err == nil {
			err = g.finish()
		}
		switch {
		case err == nil:
			return 0
		case errors.Is(err, flag.ErrHelp):
			return 0
		case errors.Is(err, errUsage):
			if !errors.Is(err, errFlagParse) { // the flag package has said it
				fmt.Fprintln(stderr, prog+":", err)
			}
			return 2
		default:
			fmt.Fprintln(stderr, prog+" "+name+":", explain(err))
			return 1
		}
	}
	fmt.Fprintf(stderr, "%s: unknown command %q\n", prog, name)
	usage(stderr, f)
	return 2
}

// start opens what the global flags ask for before a command runs.
func (g *globals) start() error {
	if g.progressTo != "" {
		g.pct = &pctFile{path: g.progressTo, stage: g.stage}
		return g.pct.report(0)
	}
	return nil
}

// finish closes a successful command: the progress file reaches 100.
func (g *globals) finish() error {
	if g.pct != nil {
		return g.pct.report(100)
	}
	return nil
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
	fs := flag.NewFlagSet(g.face.String()+" "+name, flag.ContinueOnError)
	fs.SetOutput(g.stderr)
	g.register(fs)
	return fs
}

// errFlagParse marks a command line the flag package refused (and has
// already explained on stderr).
var errFlagParse = errors.New("bad flags")

// parseArgs parses flags that may come before or after positional
// arguments ("push FILE -json" works like "push -json FILE"). A refused
// flag is a usage error (exit 2).
func parseArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	pyBools(fs)
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, fmt.Errorf("%w: %w: %w", errUsage, errFlagParse, err)
		}
		if fs.NArg() == 0 {
			return pos, nil
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

// parseFlags parses fs (global flags: they stop at the first non-flag).
func parseFlags(fs *flag.FlagSet, args []string) error {
	pyBools(fs)
	return fs.Parse(args)
}

func (g *globals) client() (*oci.Client, error) {
	opts := oci.Options{Addr: g.url, Token: g.token, Compress: true}
	if g.rootCA != "" {
		tc, err := tlsconf.ClientFile(g.rootCA, g.serverName)
		if err != nil {
			return nil, fmt.Errorf("-rootca: %w", err)
		}
		opts.TLS = tc
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

// printOutcome is printResult for push and pull, which print nothing in
// the zstcli face (their callers read only the exit code).
func (g *globals) printOutcome(v any, text func(w io.Writer)) error {
	if g.face == faceZstcli {
		return nil
	}
	return g.printResult(v, text)
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
