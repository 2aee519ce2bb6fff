package nbdserve

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// NBD protocol constants (NetworkBlockDevice/nbd doc/proto.md). Every
// number on the wire is big-endian.
const (
	magicInit      = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt       = 0x49484156454F5054 // "IHAVEOPT"
	magicOptReply  = 0x3e889045565a9
	magicRequest   = 0x25609513
	magicSimple    = 0x67446698
	magicStructure = 0x668e33ef

	// Handshake flags (server) and client flags.
	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	// Options.
	optExportName     = 1
	optAbort          = 2
	optList           = 3
	optStartTLS       = 5
	optInfo           = 6
	optGo             = 7
	optStructured     = 8
	optListMetaCtx    = 9
	optSetMetaCtx     = 10
	optExtendedHeader = 11

	// Option reply types.
	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repMetaContext = 4
	repErrUnsup    = 1<<31 + 1
	repErrPolicy   = 1<<31 + 2
	repErrInvalid  = 1<<31 + 3
	repErrUnknown  = 1<<31 + 6
	repErrShutdown = 1<<31 + 7
	repErrTooBig   = 1<<31 + 9

	// NBD_INFO types.
	infoExport    = 0
	infoBlockSize = 3

	// Transmission flags.
	tflagHasFlags  = 1 << 0
	tflagReadOnly  = 1 << 1
	tflagSendDF    = 1 << 7
	tflagMultiConn = 1 << 8

	// Commands.
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7

	// Command flags.
	cmdFlagDF     = 1 << 2
	cmdFlagReqOne = 1 << 3

	// Structured reply flags and chunk types.
	replyFlagDone       = 1 << 0
	replyTypeNone       = 0
	replyTypeOffsetData = 1
	replyTypeBlockStat  = 5
	replyTypeError      = 1<<15 + 1

	// Errors.
	errPerm     = 1
	errIO       = 5
	errInval    = 22
	errNoSpace  = 28
	errOverflow = 75
	errShutdown = 108

	// base:allocation status bits.
	stateHole = 1 << 0
	stateZero = 1 << 1

	// metaAllocation is the one metadata context we offer, and its id.
	metaAllocation   = "base:allocation"
	metaAllocationID = 1

	requestLen = 28
	maxString  = 4096 // the spec's bound on a string (export name, query)
)

// errProto is a client breaking a MUST of the protocol: the connection is
// dropped (a hard disconnect).
var errProto = errors.New("nbd protocol violation")

// request is one transmission-phase request header.
type request struct {
	flags  uint16
	typ    uint16
	handle uint64
	offset uint64
	length uint32
}

// parseRequest decodes a 28-byte request header.
func parseRequest(b []byte) (request, error) {
	if len(b) != requestLen {
		return request{}, fmt.Errorf("%w: request header of %d bytes", errProto, len(b))
	}
	if m := binary.BigEndian.Uint32(b); m != magicRequest {
		return request{}, fmt.Errorf("%w: request magic %#x", errProto, m)
	}
	return request{
		flags:  binary.BigEndian.Uint16(b[4:]),
		typ:    binary.BigEndian.Uint16(b[6:]),
		handle: binary.BigEndian.Uint64(b[8:]),
		offset: binary.BigEndian.Uint64(b[16:]),
		length: binary.BigEndian.Uint32(b[24:]),
	}, nil
}

// goRequest is the data of NBD_OPT_INFO / NBD_OPT_GO.
type goRequest struct {
	name  string
	infos []uint16
}

// parseGo decodes NBD_OPT_INFO / NBD_OPT_GO data: 32-bit name length,
// name, 16-bit count of info requests, each 16 bits.
func parseGo(b []byte) (goRequest, error) {
	name, rest, err := lenString(b)
	if err != nil {
		return goRequest{}, err
	}
	if len(rest) < 2 {
		return goRequest{}, errors.New("no information request count")
	}
	n := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*n {
		return goRequest{}, fmt.Errorf("%d information requests in %d bytes", n, len(rest))
	}
	g := goRequest{name: name, infos: make([]uint16, n)}
	for i := range g.infos {
		g.infos[i] = binary.BigEndian.Uint16(rest[2*i:])
	}
	return g, nil
}

// metaRequest is the data of NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT.
type metaRequest struct {
	name    string
	queries []string
}

// parseMeta decodes meta context option data: 32-bit export name
// length, name, 32-bit query count, each query a 32-bit length and string.
func parseMeta(b []byte) (metaRequest, error) {
	name, rest, err := lenString(b)
	if err != nil {
		return metaRequest{}, err
	}
	if len(rest) < 4 {
		return metaRequest{}, errors.New("no query count")
	}
	n := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	// Each query takes at least its 4-byte length: bound n before allocating.
	if uint64(n)*4 > uint64(len(rest)) {
		return metaRequest{}, fmt.Errorf("%d queries in %d bytes", n, len(rest))
	}
	m := metaRequest{name: name, queries: make([]string, 0, n)}
	for range n {
		var q string
		if q, rest, err = lenString(rest); err != nil {
			return metaRequest{}, err
		}
		m.queries = append(m.queries, q)
	}
	if len(rest) != 0 {
		return metaRequest{}, fmt.Errorf("%d bytes after the queries", len(rest))
	}
	return m, nil
}

// lenString reads a 32-bit length and that many bytes of string.
func lenString(b []byte) (string, []byte, error) {
	if len(b) < 4 {
		return "", nil, errors.New("no string length")
	}
	n := binary.BigEndian.Uint32(b)
	b = b[4:]
	if n > maxString || uint64(n) > uint64(len(b)) {
		return "", nil, fmt.Errorf("string of %d bytes (%d left, at most %d)", n, len(b), maxString)
	}
	return string(b[:n]), b[n:], nil
}

// optReply is a fixed-newstyle option reply header followed by data.
func optReply(opt, typ uint32, data []byte) []byte {
	b := make([]byte, 20, 20+len(data))
	binary.BigEndian.PutUint64(b, magicOptReply)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], typ)
	binary.BigEndian.PutUint32(b[16:], uint32(len(data)))
	return append(b, data...)
}

// simpleReply is a simple reply header (the data, if any, follows).
func simpleReply(errno uint32, handle uint64) []byte {
	b := make([]byte, 16)
	binary.BigEndian.PutUint32(b, magicSimple)
	binary.BigEndian.PutUint32(b[4:], errno)
	binary.BigEndian.PutUint64(b[8:], handle)
	return b
}

// chunkHeader is a structured reply chunk header for a payload of n bytes.
func chunkHeader(flags, typ uint16, handle uint64, n uint32) []byte {
	b := make([]byte, 20)
	binary.BigEndian.PutUint32(b, magicStructure)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], handle)
	binary.BigEndian.PutUint32(b[16:], n)
	return b
}

// errorChunk is a final NBD_REPLY_TYPE_ERROR chunk.
func errorChunk(handle uint64, errno uint32, msg string) []byte {
	if len(msg) > 200 {
		msg = msg[:200]
	}
	b := chunkHeader(replyFlagDone, replyTypeError, handle, uint32(6+len(msg)))
	b = binary.BigEndian.AppendUint32(b, errno)
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	return append(b, msg...)
}
