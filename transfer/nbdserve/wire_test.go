package nbdserve

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"imagestore/qcow2"
)

// Client-side messages, for protocol tests and the fuzz corpus.

func clientFlags(f uint32) []byte { return binary.BigEndian.AppendUint32(nil, f) }

func option(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, magicOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func goData(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

func metaData(name string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

func cmd(typ, flags uint16, handle, offset uint64, length uint32) []byte {
	b := binary.BigEndian.AppendUint32(nil, magicRequest)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, handle)
	b = binary.BigEndian.AppendUint64(b, offset)
	return binary.BigEndian.AppendUint32(b, length)
}

// testExport is 1 MiB: bytes i%251 in the first half, zeros (a Zero
// extent) in the second.
func testExport() Export {
	data := make([]byte, 1<<20)
	for i := range 1 << 19 {
		data[i] = byte(i % 251)
	}
	return Export{
		Name: "disk", Size: int64(len(data)), Data: bytes.NewReader(data),
		Extents: func() ([]qcow2.Extent, error) {
			return []qcow2.Extent{{Offset: 0, Length: 1 << 19, Kind: qcow2.Data}, {Offset: 1 << 19, Length: 1 << 19, Kind: qcow2.Zero}}, nil
		},
	}
}

// pipeSession runs one connection of s on a scripted client: the
// server reads in, then end of file; it returns what the server sent.
func pipeSession(t testing.TB, s *Server, in []byte) []byte {
	t.Helper()
	c := &scriptConn{in: bytes.NewReader(in)}
	s.ServeConn(context.Background(), c)
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.out.Bytes()
}

// scriptConn is a net.Conn whose client sends a fixed script and then
// hangs up, and records everything the server writes.
type scriptConn struct {
	in  *bytes.Reader
	mu  sync.Mutex
	out bytes.Buffer
}

func (c *scriptConn) Read(p []byte) (int, error) { return c.in.Read(p) }
func (c *scriptConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.out.Write(p)
}
func (c *scriptConn) Close() error                     { return nil }
func (c *scriptConn) LocalAddr() net.Addr              { return &net.UnixAddr{Name: "server", Net: "unix"} }
func (c *scriptConn) RemoteAddr() net.Addr             { return &net.UnixAddr{Name: "client", Net: "unix"} }
func (c *scriptConn) SetDeadline(time.Time) error      { return nil }
func (c *scriptConn) SetReadDeadline(time.Time) error  { return nil }
func (c *scriptConn) SetWriteDeadline(time.Time) error { return nil }

// TestSimpleReplies: a client that negotiates nothing (NBD_OPT_EXPORT_NAME,
// no structured replies) reads, is refused a write and disconnects.
func TestSimpleReplies(t *testing.T) {
	s, err := New(Options{Export: testExport()})
	if err != nil {
		t.Fatal(err)
	}
	var in []byte
	in = append(in, clientFlags(flagFixedNewstyle)...)
	in = append(in, option(optExportName, []byte("disk"))...)
	in = append(in, cmd(cmdRead, 0, 7, 1000, 16)...)
	in = append(in, cmd(cmdWrite, 0, 8, 0, 4)...)
	in = append(in, 1, 2, 3, 4)
	in = append(in, cmd(cmdRead, 0, 9, 1<<20-8, 16)...) // beyond the end
	in = append(in, cmd(cmdBlockStatus, 0, 10, 0, 512)...)
	in = append(in, cmd(cmdDisc, 0, 11, 0, 0)...)
	out := pipeSession(t, s, in)

	want := binary.BigEndian.AppendUint64(nil, magicInit)
	want = binary.BigEndian.AppendUint64(want, magicOpt)
	want = binary.BigEndian.AppendUint16(want, flagFixedNewstyle|flagNoZeroes)
	want = binary.BigEndian.AppendUint64(want, 1<<20)
	want = binary.BigEndian.AppendUint16(want, tflagHasFlags|tflagReadOnly|tflagMultiConn)
	want = append(want, make([]byte, 124)...) // no NBD_FLAG_C_NO_ZEROES
	if len(out) < len(want) || !bytes.Equal(out[:len(want)], want) {
		t.Fatalf("handshake: server sent\n%x\nwant\n%x", out, want)
	}
	// Replies may come in any order (the read runs concurrently).
	got := map[uint64][]byte{}
	r := bytes.NewReader(out[len(want):])
	for r.Len() > 0 {
		h := make([]byte, 16)
		if _, err := io.ReadFull(r, h); err != nil || binary.BigEndian.Uint32(h) != magicSimple {
			t.Fatalf("reply %x: %v", h, err)
		}
		handle := binary.BigEndian.Uint64(h[8:])
		if handle == 7 && binary.BigEndian.Uint32(h[4:]) == 0 {
			d := make([]byte, 16)
			if _, err := io.ReadFull(r, d); err != nil {
				t.Fatal(err)
			}
			h = append(h, d...)
		}
		got[handle] = h
	}
	data := simpleReply(0, 7)
	for i := 1000; i < 1016; i++ {
		data = append(data, byte(i%251))
	}
	for handle, w := range map[uint64][]byte{
		7:  data,
		8:  simpleReply(errPerm, 8),
		9:  simpleReply(errInval, 9),
		10: simpleReply(errInval, 10), // no metadata context selected
	} {
		if !bytes.Equal(got[handle], w) {
			t.Errorf("reply to %d: %x, want %x", handle, got[handle], w)
		}
	}
	if len(got) != 4 {
		t.Errorf("%d replies, want 4 (none to NBD_CMD_DISC)", len(got))
	}
}

// TestStructuredSession: structured replies, base:allocation, NBD_OPT_GO
// with a block size request, and a wrong export name.
func TestStructuredSession(t *testing.T) {
	s, err := New(Options{Export: testExport(), MaxRequest: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	var in []byte
	in = append(in, clientFlags(flagFixedNewstyle|flagNoZeroes)...)
	in = append(in, option(optSetMetaCtx, metaData("disk", metaAllocation))...) // before structured: refused
	in = append(in, option(optStructured, nil)...)
	in = append(in, option(optSetMetaCtx, metaData("disk", "qemu:dirty-bitmap:x", metaAllocation))...)
	in = append(in, option(optGo, goData("other"))...)
	in = append(in, option(optGo, goData("disk", infoBlockSize))...)
	in = append(in, cmd(cmdBlockStatus, 0, 1, 1<<19-4096, 8192)...)
	in = append(in, cmd(cmdBlockStatus, cmdFlagReqOne, 2, 0, 1<<20)...)
	in = append(in, cmd(cmdRead, 0, 3, 1<<18, 64<<10+1)...) // above MaxRequest
	in = append(in, cmd(cmdRead, 0, 4, 10, 2)...)
	in = append(in, cmd(cmdDisc, 0, 5, 0, 0)...)
	out := pipeSession(t, s, in)

	r := bytes.NewReader(out)
	next := func(n int) []byte {
		t.Helper()
		b := make([]byte, n)
		if _, err := io.ReadFull(r, b); err != nil {
			t.Fatalf("server reply short: %v (all: %x)", err, out)
		}
		return b
	}
	next(18) // greeting
	optRep := func(wantOpt, wantType uint32) []byte {
		t.Helper()
		h := next(20)
		if binary.BigEndian.Uint64(h) != magicOptReply || binary.BigEndian.Uint32(h[8:]) != wantOpt || binary.BigEndian.Uint32(h[12:]) != wantType {
			t.Fatalf("option reply %x, want option %d type %#x", h, wantOpt, wantType)
		}
		return next(int(binary.BigEndian.Uint32(h[16:])))
	}
	optRep(optSetMetaCtx, repErrInvalid)
	optRep(optStructured, repAck)
	if d := optRep(optSetMetaCtx, repMetaContext); string(d[4:]) != metaAllocation || binary.BigEndian.Uint32(d) != metaAllocationID {
		t.Fatalf("meta context reply %q", d)
	}
	optRep(optSetMetaCtx, repAck)
	optRep(optGo, repErrUnknown)
	if d := optRep(optGo, repInfo); binary.BigEndian.Uint64(d[2:]) != 1<<20 {
		t.Fatalf("export info %x", d)
	}
	if d := optRep(optGo, repInfo); binary.BigEndian.Uint16(d) != infoBlockSize || binary.BigEndian.Uint32(d[10:]) != 64<<10 {
		t.Fatalf("block size info %x", d)
	}
	optRep(optGo, repAck)

	chunk := func(wantHandle uint64, wantType uint16) []byte {
		t.Helper()
		h := next(20)
		if binary.BigEndian.Uint32(h) != magicStructure || binary.BigEndian.Uint16(h[6:]) != wantType ||
			binary.BigEndian.Uint64(h[8:]) != wantHandle || binary.BigEndian.Uint16(h[4:]) != replyFlagDone {
			t.Fatalf("chunk %x, want handle %d type %d, done", h, wantHandle, wantType)
		}
		return next(int(binary.BigEndian.Uint32(h[16:])))
	}
	bs := chunk(1, replyTypeBlockStat)
	wantBS := binary.BigEndian.AppendUint32(nil, metaAllocationID)
	wantBS = binary.BigEndian.AppendUint32(wantBS, 4096)
	wantBS = binary.BigEndian.AppendUint32(wantBS, 0)
	wantBS = binary.BigEndian.AppendUint32(wantBS, 4096)
	wantBS = binary.BigEndian.AppendUint32(wantBS, stateHole|stateZero)
	if !bytes.Equal(bs, wantBS) {
		t.Fatalf("block status %x, want %x", bs, wantBS)
	}
	if bs := chunk(2, replyTypeBlockStat); len(bs) != 12 || binary.BigEndian.Uint32(bs[4:]) != 1<<19 {
		t.Fatalf("block status with NBD_CMD_FLAG_REQ_ONE: %x", bs)
	}
	if e := chunk(3, replyTypeError); binary.BigEndian.Uint32(e) != errOverflow {
		t.Fatalf("oversized read: error %x", e)
	}
	if d := chunk(4, replyTypeOffsetData); binary.BigEndian.Uint64(d) != 10 || !bytes.Equal(d[8:], []byte{10, 11}) {
		t.Fatalf("read chunk %x", d)
	}
	if r.Len() != 0 {
		t.Fatalf("%d bytes after the last reply", r.Len())
	}
}

func TestDescriptors(t *testing.T) {
	ext := []qcow2.Extent{
		{Offset: 0, Length: 100, Kind: qcow2.Data},
		{Offset: 100, Length: 100, Kind: qcow2.Zero},
		{Offset: 200, Length: 50, Kind: qcow2.Zero},
		{Offset: 300, Length: 100, Kind: qcow2.Data}, // 250-300 is a gap: data
	}
	z := uint32(stateHole | stateZero)
	for _, tc := range []struct {
		name   string
		off, n int64
		limit  int
		want   []descriptor
	}{
		{"all", 0, 400, 10, []descriptor{{100, 0}, {150, z}, {150, 0}}},
		{"inside one", 120, 10, 10, []descriptor{{10, z}}},
		{"limit", 50, 300, 1, []descriptor{{50, 0}}},
		{"past the extents", 390, 20, 10, []descriptor{{20, 0}}},
		{"merged zero", 150, 100, 10, []descriptor{{100, z}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := descriptors(ext, tc.off, tc.n, tc.limit)
			if len(got) != len(tc.want) {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("got %v, want %v", got, tc.want)
				}
			}
		})
	}
}

// TestSocketDir: the socket goes under the given dir when its path fits a
// unix socket address and an NBD URI as it is, else under os.TempDir().
func TestSocketDir(t *testing.T) {
	base := t.TempDir()
	for _, tc := range []struct {
		name  string
		dir   string
		under bool
	}{
		{"plain", filepath.Join(base, "run"), true},
		{"equals sign", filepath.Join(base, "a=b"), true},
		{"ampersand", filepath.Join(base, "a&b"), false},
		{"space", filepath.Join(base, "a b"), false},
		{"too long", filepath.Join(base, strings.Repeat("d", 100)), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := os.MkdirAll(tc.dir, 0o755); err != nil {
				t.Fatal(err)
			}
			s, err := New(Options{Export: testExport()})
			if err != nil {
				t.Fatal(err)
			}
			l, err := s.ListenUnix(context.Background(), tc.dir)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			parent := filepath.Dir(filepath.Dir(l.Socket))
			if (parent == tc.dir) != tc.under || (!tc.under && parent != filepath.Clean(os.TempDir())) {
				t.Fatalf("socket %s for dir %s", l.Socket, tc.dir)
			}
			if fi, err := os.Stat(filepath.Dir(l.Socket)); err != nil || fi.Mode().Perm() != 0o700 {
				t.Fatalf("socket dir: %v %v", fi, err)
			}
			if len(l.Socket) > maxSocketPath || !strings.HasSuffix(l.URI(), "?socket="+l.Socket) {
				t.Fatalf("socket %s, URI %s", l.Socket, l.URI())
			}
		})
	}
}
