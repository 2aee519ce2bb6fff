package nbdserve

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sort"
	"sync"
	"time"

	"imagestore/qcow2"
)

// conn is one client connection.
type conn struct {
	s   *Server
	c   net.Conn
	r   *bufio.Reader
	log *slog.Logger

	noZeroes   bool // NBD_FLAG_C_NO_ZEROES
	structured bool // NBD_OPT_STRUCTURED_REPLY negotiated
	allocation bool // base:allocation selected

	wmu  sync.Mutex // one reply at a time on the wire
	werr error      // the first write error; guarded by wmu
}

func (cn *conn) serve(ctx context.Context) error {
	cn.r = bufio.NewReaderSize(cn.c, 64<<10)
	_ = cn.c.SetDeadline(time.Now().Add(handshakeTimeout))
	ok, err := cn.handshake()
	if err != nil || !ok {
		return err
	}
	_ = cn.c.SetDeadline(time.Time{})
	return cn.transmit(ctx)
}

// write sends the buffers as one reply; after a failed write the
// connection is closed (the reader loop then ends).
func (cn *conn) write(bufs ...[]byte) error {
	cn.wmu.Lock()
	defer cn.wmu.Unlock()
	if cn.werr != nil {
		return cn.werr
	}
	nb := net.Buffers(bufs)
	if _, err := nb.WriteTo(cn.c); err != nil {
		cn.werr = err
		_ = cn.c.Close()
		return err
	}
	return nil
}

// handshake runs the fixed newstyle negotiation. ok says transmission
// follows; !ok with a nil error is a client's clean abort.
func (cn *conn) handshake() (ok bool, err error) {
	greet := binary.BigEndian.AppendUint64(nil, magicInit)
	greet = binary.BigEndian.AppendUint64(greet, magicOpt)
	greet = binary.BigEndian.AppendUint16(greet, flagFixedNewstyle|flagNoZeroes)
	if err := cn.write(greet); err != nil {
		return false, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(cn.r, cf[:]); err != nil {
		return false, err
	}
	flags := binary.BigEndian.Uint32(cf[:])
	if flags&^(flagFixedNewstyle|flagNoZeroes) != 0 {
		return false, fmt.Errorf("%w: unknown client flags %#x", errProto, flags)
	}
	cn.noZeroes = flags&flagNoZeroes != 0
	for range maxOptions {
		var h [16]byte
		if _, err := io.ReadFull(cn.r, h[:]); err != nil {
			return false, err
		}
		if m := binary.BigEndian.Uint64(h[:]); m != magicOpt {
			return false, fmt.Errorf("%w: option magic %#x", errProto, m)
		}
		opt, n := binary.BigEndian.Uint32(h[8:]), binary.BigEndian.Uint32(h[12:])
		if n > maxOptionData {
			return false, fmt.Errorf("%w: option %d with %d bytes of data", errProto, opt, n)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(cn.r, data); err != nil {
			return false, err
		}
		done, ok, err := cn.option(opt, data)
		if done || err != nil {
			return ok, err
		}
	}
	return false, fmt.Errorf("%w: more than %d options", errProto, maxOptions)
}

// option answers one option. done ends the handshake: ok into
// transmission, else closed.
func (cn *conn) option(opt uint32, data []byte) (done, ok bool, err error) {
	e := cn.s.opts.Export
	reply := func(typ uint32, d []byte) error { return cn.write(optReply(opt, typ, d)) }
	refuse := func(typ uint32, why string) (bool, bool, error) {
		cn.log.Debug("nbd option refused", "option", opt, "why", why)
		return false, false, reply(typ, []byte(why))
	}
	switch opt {
	case optExportName:
		if string(data) != e.Name {
			// The protocol has no error reply here: the server hangs up.
			return true, false, fmt.Errorf("client asked for export %q", truncate(data))
		}
		b := binary.BigEndian.AppendUint64(nil, uint64(e.Size))
		b = binary.BigEndian.AppendUint16(b, cn.transmissionFlags())
		if !cn.noZeroes {
			b = append(b, make([]byte, 124)...)
		}
		return true, true, cn.write(b)
	case optAbort:
		_ = reply(repAck, nil)
		return true, false, nil
	case optList:
		if len(data) != 0 {
			return refuse(repErrInvalid, "NBD_OPT_LIST takes no data")
		}
		d := binary.BigEndian.AppendUint32(nil, uint32(len(e.Name)))
		if err := reply(repServer, append(d, e.Name...)); err != nil {
			return true, false, err
		}
		return false, false, reply(repAck, nil)
	case optInfo, optGo:
		g, err := parseGo(data)
		if err != nil {
			return refuse(repErrInvalid, err.Error())
		}
		if g.name != e.Name {
			return refuse(repErrUnknown, "no such export")
		}
		info := binary.BigEndian.AppendUint16(nil, infoExport)
		info = binary.BigEndian.AppendUint64(info, uint64(e.Size))
		info = binary.BigEndian.AppendUint16(info, cn.transmissionFlags())
		if err := reply(repInfo, info); err != nil {
			return true, false, err
		}
		for _, t := range g.infos {
			if t != infoBlockSize {
				continue
			}
			bs := binary.BigEndian.AppendUint16(nil, infoBlockSize)
			bs = binary.BigEndian.AppendUint32(bs, 1)    // minimum
			bs = binary.BigEndian.AppendUint32(bs, 4096) // preferred
			bs = binary.BigEndian.AppendUint32(bs, uint32(cn.s.opts.MaxRequest))
			if err := reply(repInfo, bs); err != nil {
				return true, false, err
			}
		}
		if err := reply(repAck, nil); err != nil {
			return true, false, err
		}
		return opt == optGo, opt == optGo, nil
	case optStructured:
		if len(data) != 0 {
			return refuse(repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		cn.structured = true
		return false, false, reply(repAck, nil)
	case optListMetaCtx, optSetMetaCtx:
		if !cn.structured {
			return refuse(repErrInvalid, "structured replies first")
		}
		m, err := parseMeta(data)
		if err != nil {
			return refuse(repErrInvalid, err.Error())
		}
		if m.name != e.Name {
			return refuse(repErrUnknown, "no such export")
		}
		offer := false
		for _, q := range m.queries {
			offer = offer || q == metaAllocation || (opt == optListMetaCtx && q == "base:")
		}
		if opt == optListMetaCtx && len(m.queries) == 0 {
			offer = true // an empty list asks for every context
		}
		offer = offer && e.Extents != nil
		if opt == optSetMetaCtx {
			cn.allocation = offer
		}
		if offer {
			d := binary.BigEndian.AppendUint32(nil, metaAllocationID)
			if err := reply(repMetaContext, append(d, metaAllocation...)); err != nil {
				return true, false, err
			}
		}
		return false, false, reply(repAck, nil)
	case optStartTLS:
		return refuse(repErrUnsup, "no TLS: the socket is private")
	default:
		return refuse(repErrUnsup, "unsupported option")
	}
}

func (cn *conn) transmissionFlags() uint16 {
	f := uint16(tflagHasFlags | tflagReadOnly | tflagMultiConn)
	if cn.structured {
		f |= tflagSendDF // every read is answered in one chunk anyway
	}
	return f
}

func truncate(b []byte) string {
	if len(b) > 64 {
		b = b[:64]
	}
	return string(b)
}

// transmit reads requests until NBD_CMD_DISC, an error or ctx's end.
// Reads run concurrently (at most MaxInFlight per connection, their
// buffers within the server's MaxBuffered); everything else is answered
// in order by the reading goroutine.
func (cn *conn) transmit(ctx context.Context) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	slots := make(chan struct{}, cn.s.opts.MaxInFlight)
	var hdr [requestLen]byte
	for {
		if _, err := io.ReadFull(cn.r, hdr[:]); err != nil {
			return err
		}
		req, err := parseRequest(hdr[:])
		if err != nil {
			return err
		}
		switch req.typ {
		case cmdRead:
			if errno, why := cn.checkRead(req); errno != 0 {
				if err := cn.replyError(req.handle, errno, why); err != nil {
					return err
				}
				continue
			}
			if req.length == 0 {
				if err := cn.replyRead(req, nil); err != nil {
					return err
				}
				continue
			}
			select {
			case slots <- struct{}{}:
			case <-ctx.Done():
				return ctx.Err()
			}
			if err := cn.s.budget.Acquire(ctx, int64(req.length)); err != nil {
				<-slots
				return err
			}
			wg.Go(func() {
				defer func() { <-slots }()
				defer cn.s.budget.Release(int64(req.length))
				cn.read(req)
			})
		case cmdWrite:
			// The data follows the header: skip it (bounded copy buffer).
			if _, err := io.CopyN(io.Discard, cn.r, int64(req.length)); err != nil {
				return err
			}
			if err := cn.replyError(req.handle, errPerm, "read-only export"); err != nil {
				return err
			}
		case cmdTrim, cmdWriteZeroes:
			if err := cn.replyError(req.handle, errPerm, "read-only export"); err != nil {
				return err
			}
		case cmdBlockStatus:
			if err := cn.blockStatus(req); err != nil {
				return err
			}
		case cmdDisc:
			wg.Wait()
			return nil
		default: // NBD_CMD_FLUSH, NBD_CMD_CACHE, unknown: never advertised
			if err := cn.replyError(req.handle, errInval, "unsupported command"); err != nil {
				return err
			}
		}
	}
}

// inRange: offset and length lie within the export.
func (cn *conn) inRange(req request) bool {
	size := uint64(cn.s.opts.Export.Size)
	return req.offset <= size && uint64(req.length) <= size-req.offset
}

// checkRead returns the error a read request gets before it is served (0: none).
func (cn *conn) checkRead(req request) (uint32, string) {
	allowed := uint16(0)
	if cn.structured {
		allowed = cmdFlagDF
	}
	switch {
	case req.flags&^allowed != 0:
		return errInval, "unsupported flags"
	case !cn.inRange(req):
		return errInval, "read beyond the end of the export"
	case req.length > uint32(cn.s.opts.MaxRequest):
		return errOverflow, "read larger than the maximum block size"
	}
	return 0, ""
}

// read serves one read request.
func (cn *conn) read(req request) {
	buf := make([]byte, req.length)
	n, err := cn.s.opts.Export.Data.ReadAt(buf, int64(req.offset))
	if n == len(buf) {
		err = nil // io.EOF with a full buffer at the end of the export
	} else if err == nil {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		cn.log.Warn("nbd read failed", "offset", req.offset, "length", req.length, "err", err)
		_ = cn.replyError(req.handle, errIO, "read failed")
		return
	}
	_ = cn.replyRead(req, buf)
}

// replyRead sends a read's data: a simple reply, or one final data chunk.
func (cn *conn) replyRead(req request, data []byte) error {
	if !cn.structured {
		return cn.write(simpleReply(0, req.handle), data)
	}
	if len(data) == 0 {
		return cn.write(chunkHeader(replyFlagDone, replyTypeNone, req.handle, 0))
	}
	h := chunkHeader(replyFlagDone, replyTypeOffsetData, req.handle, uint32(8+len(data)))
	return cn.write(binary.BigEndian.AppendUint64(h, req.offset), data)
}

// replyError answers a request with an error.
func (cn *conn) replyError(handle uint64, errno uint32, msg string) error {
	if cn.structured {
		return cn.write(errorChunk(handle, errno, msg))
	}
	return cn.write(simpleReply(errno, handle))
}

// blockStatus answers NBD_CMD_BLOCK_STATUS for base:allocation.
func (cn *conn) blockStatus(req request) error {
	switch {
	case !cn.allocation:
		return cn.replyError(req.handle, errInval, "no metadata context selected")
	case req.flags&^cmdFlagReqOne != 0:
		return cn.replyError(req.handle, errInval, "unsupported flags")
	case !cn.inRange(req) || req.length == 0:
		return cn.replyError(req.handle, errInval, "block status beyond the end of the export")
	}
	ext, err := cn.s.extents()
	if err != nil {
		cn.log.Warn("nbd extents failed", "err", err)
		return cn.replyError(req.handle, errIO, "extents failed")
	}
	limit := maxDescriptors
	if req.flags&cmdFlagReqOne != 0 {
		limit = 1
	}
	desc := descriptors(ext, int64(req.offset), int64(req.length), limit)
	h := chunkHeader(replyFlagDone, replyTypeBlockStat, req.handle, uint32(4+8*len(desc)))
	b := binary.BigEndian.AppendUint32(h, metaAllocationID)
	for _, d := range desc {
		b = binary.BigEndian.AppendUint32(b, d.length)
		b = binary.BigEndian.AppendUint32(b, d.status)
	}
	return cn.write(b)
}

type descriptor struct{ length, status uint32 }

// descriptors describes [off, off+n) from ext (sorted): at least one and
// at most limit descriptors, consecutive ones of different status, their
// lengths summing to at most n. A range ext does not cover reads as data.
func descriptors(ext []qcow2.Extent, off, n int64, limit int) []descriptor {
	end := off + n
	i := sort.Search(len(ext), func(i int) bool { return ext[i].End() > off })
	var out []descriptor
	for pos := off; pos < end; {
		status, next := uint32(0), end
		switch {
		case i < len(ext) && ext[i].Offset <= pos:
			next = min(end, ext[i].End())
			if ext[i].Kind != qcow2.Data {
				status = stateHole | stateZero
			}
			i++
		case i < len(ext):
			next = min(end, ext[i].Offset) // a gap: data
		}
		if next <= pos { // a malformed (empty or overlapping) extent
			continue
		}
		if l := len(out); l > 0 && out[l-1].status == status {
			out[l-1].length += uint32(next - pos)
		} else {
			if l == limit {
				break
			}
			out = append(out, descriptor{length: uint32(next - pos), status: status})
		}
		pos = next
	}
	return out
}
