package agent

import (
	"context"
	"crypto/md5"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/internal/fsutil"
)

// Exports live in <root>/exports/<token>/ with the file and export.json;
// they are served at GET /exports/<token>/<file>.
const exportURLPrefix = "/exports/"

// exportTokenLen is the length of an export token: 32 hex digits, 128
// random bits, which make the URL its own credential (see dispatch).
const exportTokenLen = 32

type exportMeta struct {
	InstallPath string    `json:"installPath"`
	ExtFmt      string    `json:"extFmt"`
	File        string    `json:"file"`
	MD5Sum      string    `json:"md5Sum"`
	Size        int64     `json:"size"`
	Created     time.Time `json:"created"`
}

type exportReq struct {
	InstallPath string `json:"installPath"`
	ExtFmt      string `json:"extFmt"`
	ImgURL      string `json:"imgUrl"` // delexp may name the URL instead
}

func (q *exportReq) validate() error {
	if q.InstallPath == "" && q.ImgURL == "" {
		return missing("installPath")
	}
	switch q.ExtFmt {
	case "", "qcow2", "raw":
	default:
		return fmt.Errorf("extFmt %q not supported (qcow2 or raw)", q.ExtFmt)
	}
	return nil
}

type exportReply struct {
	ImgURL string `json:"imgUrl"`
	MD5Sum string `json:"md5Sum"`
	Size   int64  `json:"size"`
	Format string `json:"format"`
	// DatabaseBackupURL repeats imgUrl for database backups (image name
	// zsbak), the field ExportDatabaseBackupFromBackupStorage returns.
	DatabaseBackupURL string `json:"databaseBackupUrl,omitempty"`
}

// exportBase is the scheme://host the export URLs use.
func (a *Agent) exportBase(r *http.Request) string {
	if a.cfg.ExportURLBase != "" {
		return strings.TrimRight(a.cfg.ExportURLBase, "/")
	}
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	return scheme + "://" + r.Host
}

// export makes an image downloadable: a qcow2 chain is flattened into one
// standalone image (qcow2 or raw per extFmt); a base layer or an opaque blob
// is hard-linked as is. Exporting the same image and format again reuses it.
func (a *Agent) export(w http.ResponseWriter, r *http.Request) {
	var req exportReq
	err := decode(r, &req)
	if err == nil && req.InstallPath == "" {
		err = missing("installPath")
	}
	base := a.exportBase(r)
	a.async(w, r, JobSpec{Kind: "export", Backup: true, Err: err}, func(ctx context.Context, job *Job) (any, error) {
		img, err := a.lookupImage(ctx, "installPath", req.InstallPath)
		if err != nil {
			return nil, err
		}
		job.SetImage("", img.InstallPath(), img.Format)
		meta, token, err := a.makeExport(ctx, job, img, req.ExtFmt)
		if err != nil {
			return nil, err
		}
		rep := exportReply{ImgURL: base + exportURLPrefix + token + "/" + meta.File, MD5Sum: meta.MD5Sum, Size: meta.Size, Format: meta.ExtFmt}
		if img.Name == databaseBackupName {
			rep.DatabaseBackupURL = rep.ImgURL
		}
		return rep, nil
	})
}

// exportFlight is an export being written: its token dir exists without
// export.json. Exports of the same image and format wait for it.
type exportFlight struct {
	token string
	done  chan struct{}
	meta  exportMeta // set before done closes
	err   error
}

// exportFlights holds the exports being written, by export root, so that
// exportMu is held only to look up and reserve, never for a flatten.
var exportFlights = struct {
	sync.Mutex
	byKey   map[string]*exportFlight // root \x00 installPath \x00 extFmt
	byToken map[string]bool          // root \x00 token
}{byKey: map[string]*exportFlight{}, byToken: map[string]bool{}}

// exportFlattenHook, if set (tests), runs before an export's data is written.
var exportFlattenHook atomic.Pointer[func(installPath string)]

func (a *Agent) makeExport(ctx context.Context, job *Job, img blobstore.Image, extFmt string) (exportMeta, string, error) {
	if extFmt == "" {
		extFmt = img.Format
	}
	if img.Format != "qcow2" && extFmt != img.Format {
		return exportMeta{}, "", fmt.Errorf("image %s has format %s; it can only be exported as is (extFmt %s)", img.Ref, img.Format, img.Format)
	}
	key := a.exportRoot + "\x00" + img.InstallPath() + "\x00" + extFmt
	a.exportMu.Lock()
	existing, err := a.listExports()
	if err != nil {
		a.exportMu.Unlock()
		return exportMeta{}, "", err
	}
	for token, m := range existing {
		// An export past half its life is not handed out again: a caller
		// gets a URL with at least half of exportExpiry left.
		if m.InstallPath == img.InstallPath() && m.ExtFmt == extFmt && !a.exportExpired(m, time.Now().Add(a.cfg.ExportExpiry/2)) {
			a.exportMu.Unlock()
			return m, token, nil
		}
	}
	exportFlights.Lock()
	fl := exportFlights.byKey[key]
	exportFlights.Unlock()
	if fl != nil {
		// The same export is being written: share its result.
		a.exportMu.Unlock()
		select {
		case <-fl.done:
			return fl.meta, fl.token, fl.err
		case <-ctx.Done():
			return exportMeta{}, "", context.Cause(ctx)
		}
	}
	token := randomHex(exportTokenLen / 2)
	dir := filepath.Join(a.exportRoot, token)
	if err := os.Mkdir(dir, 0o755); err != nil {
		a.exportMu.Unlock()
		return exportMeta{}, "", err
	}
	fl = &exportFlight{token: token, done: make(chan struct{})}
	exportFlights.Lock()
	exportFlights.byKey[key] = fl
	exportFlights.byToken[a.exportRoot+"\x00"+token] = true
	exportFlights.Unlock()
	a.exportMu.Unlock()

	fl.meta, fl.err = a.writeExport(ctx, job, img, extFmt, dir)
	if fl.err != nil {
		_ = os.RemoveAll(dir)
	}
	exportFlights.Lock()
	delete(exportFlights.byKey, key)
	delete(exportFlights.byToken, a.exportRoot+"\x00"+token)
	exportFlights.Unlock()
	close(fl.done)
	if fl.err != nil {
		return exportMeta{}, "", fl.err
	}
	a.log.Info("export created", "image", img.Ref.String(), "format", extFmt, "token", token[:8]+"…", "size", fl.meta.Size)
	return fl.meta, token, nil
}

// writeExport writes an export's file and, last, its export.json into dir.
func (a *Agent) writeExport(ctx context.Context, job *Job, img blobstore.Image, extFmt, dir string) (exportMeta, error) {
	meta := exportMeta{InstallPath: img.InstallPath(), ExtFmt: extFmt, File: img.Name + "-" + img.ID + "." + extFmt}
	if h := exportFlattenHook.Load(); h != nil {
		(*h)(img.InstallPath())
	}
	dst := filepath.Join(dir, meta.File)
	h := md5.New()
	if img.Format == "qcow2" && (img.Parent != "" || extFmt == "raw") {
		f, err := os.Create(dst + ".tmp")
		if err != nil {
			return meta, err
		}
		n, err := flattenChain(ctx, a.store, img, extFmt, io.MultiWriter(f, h, jobs.Writer(job)))
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return meta, fmt.Errorf("flattening %s: %w", img.Ref, err)
		}
		if err := os.Rename(dst+".tmp", dst); err != nil {
			return meta, err
		}
		meta.Size = n
	} else {
		// The blob is immutable, so a hard link is a safe zero-copy export.
		src, err := a.store.BlobPath(img.Blob)
		if err != nil {
			return meta, err
		}
		if err := os.Link(src, dst); err != nil {
			if err := copyFile(ctx, src, dst); err != nil {
				return meta, err
			}
		}
		f, err := os.Open(dst)
		if err != nil {
			return meta, err
		}
		fi, _ := f.Stat()
		job.SetTotal(fi.Size())
		n, err := io.Copy(h, jobs.Reader(job, ctxReader(ctx, f)))
		f.Close()
		if err != nil {
			return meta, err
		}
		meta.Size = n
	}
	meta.MD5Sum = hex.EncodeToString(h.Sum(nil))
	// The URL's life (exportExpiry) counts from here, when it starts to work.
	meta.Created = time.Now().UTC()
	b, _ := json.MarshalIndent(meta, "", "  ")
	if err := fsutil.WriteFile(filepath.Join(dir, "export.json"), b, 0o600); err != nil {
		return meta, err
	}
	return meta, nil
}

func copyFile(ctx context.Context, src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, ctxReader(ctx, in)); err != nil {
		out.Close()
		return err
	}
	if err := out.Sync(); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// listExports maps token to metadata. Call it with exportMu held: it
// also sweeps token dirs that have no export.json and are not being
// written, which a crash during an export leaves behind.
func (a *Agent) listExports() (map[string]exportMeta, error) {
	ents, err := os.ReadDir(a.exportRoot)
	if err != nil {
		return nil, err
	}
	out := map[string]exportMeta{}
	for _, e := range ents {
		if !e.IsDir() || !isHex(e.Name()) {
			continue
		}
		m, err := a.readExportMeta(e.Name())
		if errors.Is(err, fs.ErrNotExist) {
			a.sweepExport(e.Name())
			continue
		}
		if err != nil {
			continue
		}
		if a.exportExpired(m, time.Now()) {
			// A download in progress keeps its open file; new ones get 404.
			if err := os.RemoveAll(filepath.Join(a.exportRoot, e.Name())); err != nil {
				a.log.Warn("removing an expired export", "installPath", m.InstallPath, "err", err)
			} else {
				a.log.Info("removed an expired export", "installPath", m.InstallPath, "created", m.Created)
			}
			continue
		}
		out[e.Name()] = m
	}
	return out, nil
}

// exportExpired reports whether m is past exportExpiry at now.
func (a *Agent) exportExpired(m exportMeta, now time.Time) bool {
	return a.cfg.ExportExpiry > 0 && now.Sub(m.Created) > a.cfg.ExportExpiry
}

// sweepExports removes leftovers of exports interrupted by a crash and
// expired exports; run at startup and by housekeeping (listExports also
// does, on every export and delexp).
func (a *Agent) sweepExports() {
	a.exportMu.Lock()
	defer a.exportMu.Unlock()
	if _, err := a.listExports(); err != nil {
		a.log.Warn("sweeping exports", "err", err)
	}
}

// sweepExport removes the token dir of an export that has no export.json
// unless it is being written now. exportMu must be held.
func (a *Agent) sweepExport(token string) {
	exportFlights.Lock()
	busy := exportFlights.byToken[a.exportRoot+"\x00"+token]
	exportFlights.Unlock()
	if busy {
		return
	}
	if err := os.RemoveAll(filepath.Join(a.exportRoot, token)); err != nil {
		a.log.Warn("removing an interrupted export", "token", token[:8]+"…", "err", err)
		return
	}
	a.log.Warn("removed an interrupted export (no export.json)", "token", token[:8]+"…")
}

func (a *Agent) readExportMeta(token string) (exportMeta, error) {
	var m exportMeta
	b, err := os.ReadFile(filepath.Join(a.exportRoot, token, "export.json"))
	if err != nil {
		return m, err
	}
	return m, json.Unmarshal(b, &m)
}

func isHex(s string) bool {
	if len(s) != 32 {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil
}

type delExportReply struct {
	Deleted int `json:"deleted"`
}

// delExport removes the exports of installPath (only extFmt's, if given),
// or the one imgUrl names.
func (a *Agent) delExport(w http.ResponseWriter, r *http.Request) {
	var req exportReq
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "delexp", Err: err}, func(ctx context.Context, job *Job) (any, error) {
		a.exportMu.Lock()
		defer a.exportMu.Unlock()
		var wantToken string
		if req.ImgURL != "" {
			i := strings.Index(req.ImgURL, exportURLPrefix)
			if i < 0 {
				return nil, fmt.Errorf("imgUrl %q is not an export URL of this agent", req.ImgURL)
			}
			wantToken, _, _ = strings.Cut(req.ImgURL[i+len(exportURLPrefix):], "/")
		}
		if req.InstallPath != "" {
			if _, err := parseImagePath("installPath", req.InstallPath); err != nil {
				return nil, err
			}
		}
		exps, err := a.listExports()
		if err != nil {
			return nil, err
		}
		n := 0
		for token, m := range exps {
			match := (wantToken == "" || token == wantToken) &&
				(req.InstallPath == "" || m.InstallPath == req.InstallPath) &&
				(req.ExtFmt == "" || m.ExtFmt == req.ExtFmt)
			if !match {
				continue
			}
			if err := os.RemoveAll(filepath.Join(a.exportRoot, token)); err != nil {
				return nil, err
			}
			n++
		}
		return delExportReply{Deleted: n}, nil
	})
}

// serveExport serves GET/HEAD /exports/<token>/<file> with Range support.
func (a *Agent) serveExport(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	token, file, ok := strings.Cut(strings.TrimPrefix(r.URL.Path, exportURLPrefix), "/")
	if !ok || len(token) != exportTokenLen || !isHex(token) {
		http.NotFound(w, r)
		return
	}
	m, err := a.readExportMeta(token)
	if err != nil || m.File != file || a.exportExpired(m, time.Now()) {
		http.NotFound(w, r)
		return
	}
	f, err := os.Open(filepath.Join(a.exportRoot, token, m.File))
	if err != nil {
		http.NotFound(w, r)
		return
	}
	defer f.Close()
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-MD5-Hex", m.MD5Sum)
	w.Header().Set("ETag", `"`+m.MD5Sum+`"`)
	cw := &countingWriter{ResponseWriter: w}
	http.ServeContent(cw, r, m.File, m.Created, f)
	a.m.bytesExported.Add(float64(cw.n))
}

type countingWriter struct {
	http.ResponseWriter
	n int64
}

func (c *countingWriter) Write(b []byte) (int, error) {
	n, err := c.ResponseWriter.Write(b)
	c.n += int64(n)
	return n, err
}
