package main

import (
	"context"
	"crypto/md5"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"hash"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/transfer/oci"
	"imagestore/transfer/ratelimit"
)

// DBName is the repository of database backups.
const DBName = "zsbak"

// dbDesc is the desc JSON of a database backup image (issue 7).
type dbDesc struct {
	Name        string `json:"name"`
	Description string `json:"description"`
	Version     string `json:"version"`
	Type        string `json:"type"`
	CreatedTime int64  `json:"createdTime"` // Unix milliseconds
	MD5         string `json:"md5"`
}

// mysqlConn are the connection flags shared by backup and restore. The
// password never reaches a command line: it goes to the client through a
// 0600 defaults file that is removed when the client exits.
type mysqlConn struct {
	host, user, password, passwordFile, socket string
	port                                       int
	mysqldump, mysql                           string
}

func (m *mysqlConn) register(fs *flag.FlagSet) {
	fs.StringVar(&m.host, "mysql-host", "", "MariaDB/MySQL host (default: the local socket)")
	fs.IntVar(&m.port, "mysql-port", 0, "MariaDB/MySQL port")
	fs.StringVar(&m.user, "mysql-user", "", "user (default: the client's default)")
	fs.StringVar(&m.password, "mysql-password", "", "password (prefer -mysql-password-file or $IMAGESTORE_MYSQL_PASSWORD)")
	fs.StringVar(&m.passwordFile, "mysql-password-file", "", "file holding the password")
	fs.StringVar(&m.socket, "mysql-socket", "", "unix socket")
	fs.StringVar(&m.mysqldump, "mysqldump", "mysqldump", "mysqldump binary")
	fs.StringVar(&m.mysql, "mysql", "mysql", "mysql client binary")
}

// clientArgs writes the defaults file (when a password is set) and returns
// the arguments every client call starts with, and a cleanup.
func (m *mysqlConn) clientArgs() ([]string, func(), error) {
	pw := m.password
	if pw == "" {
		pw = os.Getenv("IMAGESTORE_MYSQL_PASSWORD")
	}
	if m.passwordFile != "" {
		b, err := os.ReadFile(m.passwordFile)
		if err != nil {
			return nil, nil, fmt.Errorf("-mysql-password-file: %w", err)
		}
		pw = strings.TrimRight(string(b), "\r\n")
	}
	var args []string
	cleanup := func() {}
	if pw != "" {
		f, err := os.CreateTemp("", "imagestore-my-*.cnf")
		if err != nil {
			return nil, nil, err
		}
		cleanup = func() { os.Remove(f.Name()) }
		// Option-file quoting: backslash and double quote escaped.
		q := strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(pw)
		_, werr := fmt.Fprintf(f, "[client]\npassword=\"%s\"\n", q)
		if cerr := f.Close(); werr == nil {
			werr = cerr
		}
		if werr == nil {
			werr = os.Chmod(f.Name(), 0o600)
		}
		if werr != nil {
			cleanup()
			return nil, nil, werr
		}
		// --defaults-extra-file must be the first option.
		args = append(args, "--defaults-extra-file="+f.Name())
	}
	if m.host != "" {
		args = append(args, "--host="+m.host)
	}
	if m.port != 0 {
		args = append(args, "--port="+strconv.Itoa(m.port), "--protocol=TCP")
	}
	if m.user != "" {
		args = append(args, "--user="+m.user)
	}
	if m.socket != "" {
		args = append(args, "--socket="+m.socket)
	}
	return args, cleanup, nil
}

func cmdDB(ctx context.Context, g *globals, args []string) error {
	if len(args) == 0 {
		return usageErr("db backup|restore ...")
	}
	switch args[0] {
	case "backup":
		return dbBackup(ctx, g, args[1:])
	case "restore":
		return dbRestore(ctx, g, args[1:])
	case "-h", "-help", "--help":
		fs := g.subFlags("db")
		fmt.Fprintln(g.stderr, "usage: imagestore db backup|restore [flags] (db backup -h, db restore -h)")
		fs.PrintDefaults()
		return flag.ErrHelp
	}
	return usageErr("db: unknown subcommand %q (backup or restore)", args[0])
}

type dbBackupResult struct {
	Name        string `json:"name"`
	ID          string `json:"id"`
	Size        int64  `json:"size"`        // gzip bytes stored
	VirtualSize int64  `json:"virtualsize"` // dump bytes
	Blobsum     string `json:"blobsum"`
	MD5         string `json:"md5"`
	InstallPath string `json:"installPath"`
}

// tailBuffer keeps the last bytes of a stream (a client's stderr), safely
// for the exec goroutine that fills it.
type tailBuffer struct {
	mu sync.Mutex
	b  []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > 4096 {
		t.b = t.b[len(t.b)-4096:]
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return strings.TrimSpace(string(t.b))
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

func dbBackup(ctx context.Context, g *globals, args []string) error {
	fs := g.subFlags("db backup")
	var conn mysqlConn
	conn.register(fs)
	dbs := fs.String("databases", "", "databases to dump, comma- or space-separated (the rest of the arguments are taken too)")
	desc := fs.String("description", "", "description stored in the backup's desc")
	version := fs.String("version", "", "version stored in the backup's desc (default: mysqldump --version)")
	id := fs.String("id", "", "backup id (default: a new random id)")
	var bw byteFlag
	fs.Var(&bw, "bwlimit", "upload limit in bytes/s (0 = none)")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	names := strings.FieldsFunc(*dbs, func(r rune) bool { return r == ',' || r == ' ' })
	names = append(names, pos...)
	if len(names) == 0 {
		return usageErr("db backup --databases DB... [--mysql-...]")
	}
	for _, n := range names {
		if strings.HasPrefix(n, "-") {
			return usageErr("bad database name %q", n)
		}
	}
	ref := blobstore.Ref{Name: DBName, ID: *id}
	if ref.ID == "" {
		ref.ID = newID(8)
	}
	if err := ref.Validate(); err != nil {
		return usageErr("%v", err)
	}
	c, err := g.connect(ctx)
	if err != nil {
		return err
	}
	defer c.CloseIdleConnections()
	cargs, cleanup, err := conn.clientArgs()
	if err != nil {
		return err
	}
	defer cleanup()
	ver := *version
	if ver == "" {
		if out, err := exec.CommandContext(ctx, conn.mysqldump, "--version").Output(); err == nil {
			ver = strings.TrimSpace(string(out))
		}
	}

	p := g.newProgress("db backup", 0)
	dump, err := pushDump(ctx, c, conn.mysqldump, cargs, names, ratelimit.New(bw.v), p)
	p.Done()
	if err != nil {
		return fmt.Errorf("db backup: %w", err)
	}
	now := time.Now().UTC()
	descJSON, _ := json.Marshal(dbDesc{
		Name: strings.Join(names, ","), Description: *desc, Version: ver, Type: "mysql",
		CreatedTime: now.UnixMilli(), MD5: dump.md5,
	})
	img := blobstore.Image{Ref: ref, Blob: dump.blob, Created: now.Truncate(time.Second), Desc: string(descJSON),
		Size: dump.size, VirtualSize: dump.dumped, Format: "gzip"}
	if err := putImage(ctx, c, []blobstore.Image{img}); err != nil {
		return err
	}
	res := dbBackupResult{Name: ref.Name, ID: ref.ID, Size: dump.size, VirtualSize: dump.dumped, Blobsum: dump.blob.String(), MD5: dump.md5, InstallPath: ref.InstallPath()}
	return g.printResult(res, func(w io.Writer) {
		fmt.Fprintf(w, "%s:%s size=%d dump=%d md5=%s\n", res.Name, res.ID, res.Size, res.VirtualSize, res.MD5)
	})
}

// dump is what one mysqldump run stored.
type dump struct {
	blob   digest.Digest
	size   int64  // gzip bytes stored
	dumped int64  // dump bytes
	md5    string // of the gzip bytes, hex
}

// pushDump streams mysqldump's output over names into a blob of DBName:
// mysqldump → count → gzip → (md5, pipe) → chunked registry upload. A
// failed dump fails the upload, so no partial blob is committed.
func pushDump(ctx context.Context, c *oci.Client, mysqldump string, cargs, names []string, lim *ratelimit.Limiter, p *progress) (dump, error) {
	dctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cmd := exec.CommandContext(dctx, mysqldump, append(cargs,
		"--single-transaction", "--routines", "--events", "--triggers", "--hex-blob", "--databases", "--")...)
	cmd.Args = append(cmd.Args, names...)
	var stderr tailBuffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return dump{}, err
	}
	if err := cmd.Start(); err != nil {
		return dump{}, fmt.Errorf("mysqldump: %w", err)
	}
	pr, pw := io.Pipe()
	md := md5.New()
	var dumped countWriter
	prodDone := make(chan struct{})
	go func() {
		defer close(prodDone)
		gz, _ := gzip.NewWriterLevel(io.MultiWriter(pw, md), gzip.DefaultCompression)
		_, cerr := io.Copy(gz, io.TeeReader(out, &dumped))
		if cerr == nil {
			cerr = gz.Close()
		}
		if werr := cmd.Wait(); werr != nil {
			cerr = fmt.Errorf("mysqldump: %w: %s", werr, stderr.String())
		}
		pw.CloseWithError(cerr) // nil = EOF: the upload commits
	}()
	d, size, err := c.PushStream(ctx, DBName, ratelimit.Reader(ctx, pr, lim), oci.StreamOptions{Progress: p.Add})
	if err != nil {
		cancel()
		pr.CloseWithError(err)
	}
	<-prodDone
	if err != nil {
		return dump{}, err
	}
	return dump{blob: d, size: size, dumped: dumped.n, md5: hex.EncodeToString(md.Sum(nil))}, nil
}

// ErrBackupCorrupt: a backup's bytes do not match its recorded md5 or digest.
var ErrBackupCorrupt = errors.New("database backup is corrupt")

func dbRestore(ctx context.Context, g *globals, args []string) error {
	fs := g.subFlags("db restore")
	var conn mysqlConn
	conn.register(fs)
	var bw byteFlag
	fs.Var(&bw, "bwlimit", "download limit in bytes/s (0 = none)")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageErr("db restore zsbak:ID [--mysql-...]")
	}
	c, ri, err := g.openImage(ctx, pos[0])
	if err != nil {
		return err
	}
	defer c.CloseIdleConnections()
	top := ri.Top()
	if len(ri.Chain) != 1 || top.Format != "gzip" {
		return fmt.Errorf("%s is not a database backup (format %q, %d layers)", ri.Ref, top.Format, len(ri.Chain))
	}
	var dd dbDesc
	if top.Desc != "" {
		if err := json.Unmarshal([]byte(top.Desc), &dd); err != nil {
			return fmt.Errorf("%s: desc is not a backup description: %w", ri.Ref, err)
		}
	}
	f, err := fetchDump(ctx, g, c, ri, dd.MD5, ratelimit.New(bw.v))
	if err != nil {
		return err
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrBackupCorrupt, err)
	}
	defer zr.Close()
	cargs, cleanup, err := conn.clientArgs()
	if err != nil {
		return err
	}
	defer cleanup()
	cmd := exec.CommandContext(ctx, conn.mysql, append(cargs, "--batch")...)
	var stderr tailBuffer
	cmd.Stderr = &stderr
	cmd.Stdout = io.Discard
	var fed countWriter
	cmd.Stdin = io.TeeReader(zr, &fed)
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("mysql: %w: %s", err, stderr.String())
	}
	res := struct {
		Name     string `json:"name"`
		ID       string `json:"id"`
		Restored int64  `json:"restored"`
		Blobsum  string `json:"blobsum"`
	}{ri.Ref.Name, ri.Ref.ID, fed.n, top.Blob.String()}
	return g.printResult(res, func(w io.Writer) {
		fmt.Fprintf(w, "%s:%s restored (%d bytes of SQL)\n", res.Name, res.ID, res.Restored)
	})
}

// fetchDump downloads the backup's stored (gzip) bytes to a temp file and
// checks them against the digest and wantMD5 (if set), so they are
// verified before a single statement runs. The file is already unlinked:
// closing it frees it.
func fetchDump(ctx context.Context, g *globals, c *oci.Client, ri *remoteImage, wantMD5 string, lim *ratelimit.Limiter) (*os.File, error) {
	tmp, err := os.CreateTemp("", "imagestore-dbrestore-*")
	if err != nil {
		return nil, err
	}
	defer os.Remove(tmp.Name())
	p := g.newProgress("download", ri.Top().Size)
	_, err = downloadBlob(ctx, c, ri.Ref.Name, ri.Manifest.Layers[0], tmp, lim, p.Add)
	p.Done()
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		if errors.Is(err, oci.ErrDigestInvalid) {
			return nil, fmt.Errorf("%w: %v", ErrBackupCorrupt, err)
		}
		return nil, err
	}
	f, err := os.Open(tmp.Name())
	if err != nil {
		return nil, err
	}
	if wantMD5 != "" {
		sum, err := hashFile(f, md5.New())
		if err != nil {
			f.Close()
			return nil, err
		}
		if !strings.EqualFold(sum, wantMD5) {
			f.Close()
			return nil, fmt.Errorf("%w: %s: md5 %s, desc says %s", ErrBackupCorrupt, ri.Ref, sum, wantMD5)
		}
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

func hashFile(r io.Reader, h hash.Hash) (string, error) {
	if _, err := io.Copy(h, r); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
