package exports

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os/exec"
	"strconv"
	"strings"

	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/internal/redact"
	"imagestore/transfer/nbdserve"
)

// RemoteTarget is where WriteRemote writes an image.
type RemoteTarget struct {
	// URL is nbd://host:port[/export]; no other scheme is supported.
	URL string
	// Concurrency is qemu-img's parallel writes (-m), clamped to 1..16.
	Concurrency int
}

// ErrUnsupportedTarget: a remote target URL of a scheme or form
// WriteRemote does not write to.
var ErrUnsupportedTarget = errors.New("remote target not supported")

// maxRemoteConcurrency bounds qemu-img convert -m (qemu's own limit is 16).
const maxRemoteConcurrency = 16

// WriteRemote writes img's guest view into the NBD export t.URL names:
// qemu-img convert -n (the target exists and is not created or resized)
// writes raw over NBD, whatever the file behind the NBD server is. A
// qcow2 image's chain is opened through layer.Store.OpenChain (held
// against GC, checked, every layer's digest verified) and read by
// qemu-img in place; a raw or ISO image's blob is verified and held the
// same way. On a store without local blob paths (S3) qemu-img reads the
// same guest view from our own NBD server (transfer/nbdserve) on a
// private unix socket instead: the chain through our qcow2 reader, a raw
// or ISO blob as it is. The target must be at least the image's virtual
// size.
func (s *Service) WriteRemote(ctx context.Context, p jobs.Progress, img blobstore.Image, t RemoteTarget) error {
	target, err := nbdTarget(t.URL)
	if err != nil {
		return err
	}
	p.SetImage("", img.InstallPath(), img.Format)
	var srcFmt string
	var export nbdserve.Export // what the no-path route serves
	switch img.Format {
	case "qcow2":
		chain, closeChain, err := s.layers.OpenChain(ctx, img.Ref)
		if err != nil {
			return err
		}
		defer closeChain()
		srcFmt = "qcow2"
		export = nbdserve.Export{Size: chain.VirtualSize(), Data: chain, Extents: chain.Extents}
	case "raw", "iso":
		release := s.layers.Blobs().Hold(img.Blob)
		defer release()
		if err := s.layers.Blobs().VerifyBlob(ctx, img.Blob); err != nil {
			return fmt.Errorf("image %s (%s) failed verification: %w", img.Ref, img.Blob, err)
		}
		srcFmt = "raw"
	default:
		return fmt.Errorf("image %s has format %s; only qcow2, raw and iso images can be written to a remote target", img.Ref, img.Format)
	}
	src, err := s.layers.Blobs().BlobPath(img.Blob)
	if errors.Is(err, blobstore.ErrNoLocalPath) {
		if export.Data == nil {
			b, err := s.layers.Blobs().OpenBlob(ctx, img.Blob)
			if err != nil {
				return err
			}
			defer b.Close()
			export = nbdserve.Export{Size: b.Size(), Data: b}
		}
		export.Name = "image"
		srv, err := nbdserve.New(nbdserve.Options{Export: export, Logger: s.log.With("image", img.Ref.String())})
		if err != nil {
			return err
		}
		// A private 0700 dir under $TMPDIR; removed when the write ends.
		l, err := srv.ListenUnix(ctx, "")
		if err != nil {
			return err
		}
		defer l.Close()
		src, srcFmt = l.URI(), "raw"
	} else if err != nil {
		return err
	}
	m := min(max(t.Concurrency, 1), maxRemoteConcurrency)
	args := []string{"convert", "-n", "-f", srcFmt, "-O", "raw", "-m", strconv.Itoa(m)}
	if m > 1 {
		args = append(args, "-W") // out-of-order writes: the target is a plain block device
	}
	args = append(args, src, target)
	qemuImg := s.opts.QemuImg
	if qemuImg == "" {
		qemuImg = "qemu-img"
	}
	p.SetTotal(img.VirtualSize)
	cmd := exec.CommandContext(ctx, qemuImg, args...)
	if out, err := cmd.CombinedOutput(); err != nil {
		if cerr := context.Cause(ctx); cerr != nil {
			return cerr
		}
		return fmt.Errorf("writing %s to %s: qemu-img convert: %w: %s", img.Ref, target, err, strings.TrimSpace(string(out)))
	}
	p.Add(img.VirtualSize)
	s.log.Info("image written to a remote target", "image", img.Ref.String(), "target", target, "concurrency", m)
	return nil
}

// nbdTarget checks a remote target URL and rebuilds it as the plain
// nbd://host:port[/export] qemu-img is given: no user, query (qemu reads
// ?socket= as a local socket path) or fragment, a port, and an export
// name of [A-Za-z0-9._:-].
func nbdTarget(raw string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return "", fmt.Errorf("%w: remoteTargetUrl %s is not a URL (nbd://host:port[/export])", ErrUnsupportedTarget, redact.URL(raw))
	}
	if !strings.EqualFold(u.Scheme, "nbd") {
		return "", fmt.Errorf("%w: remoteTargetUrl %s: scheme %q is not supported; only nbd://host:port[/export] is", ErrUnsupportedTarget, redact.URL(raw), u.Scheme)
	}
	if u.User != nil || u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || u.Opaque != "" {
		return "", fmt.Errorf("%w: remoteTargetUrl %s: only nbd://host:port[/export] is supported (no user, query or fragment)", ErrUnsupportedTarget, redact.URL(raw))
	}
	host, port := u.Hostname(), u.Port()
	if host == "" || port == "" {
		return "", fmt.Errorf("%w: remoteTargetUrl %s needs a host and a port (nbd://host:port[/export])", ErrUnsupportedTarget, redact.URL(raw))
	}
	if net.ParseIP(host) == nil && strings.Trim(host, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_") != "" {
		return "", fmt.Errorf("%w: remoteTargetUrl %s: host %q", ErrUnsupportedTarget, redact.URL(raw), host)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return "", fmt.Errorf("%w: remoteTargetUrl %s: port %q", ErrUnsupportedTarget, redact.URL(raw), port)
	}
	export := strings.TrimPrefix(u.Path, "/")
	for _, c := range export {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == ':' || c == '-') {
			return "", fmt.Errorf("%w: remoteTargetUrl %s: export name %q (only [A-Za-z0-9._:-])", ErrUnsupportedTarget, redact.URL(raw), export)
		}
	}
	out := "nbd://" + net.JoinHostPort(host, port)
	if export != "" {
		out += "/" + export
	}
	return out, nil
}
