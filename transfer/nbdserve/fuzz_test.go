package nbdserve

import (
	"testing"
)

// FuzzSession feeds arbitrary client bytes to a connection: the server
// must neither panic nor hang, whatever it is sent (handshake, options,
// requests with any lengths and offsets).
func FuzzSession(f *testing.F) {
	var good []byte
	good = append(good, clientFlags(flagFixedNewstyle|flagNoZeroes)...)
	good = append(good, option(optStructured, nil)...)
	good = append(good, option(optListMetaCtx, metaData("disk"))...)
	good = append(good, option(optSetMetaCtx, metaData("disk", metaAllocation))...)
	good = append(good, option(optList, nil)...)
	good = append(good, option(optInfo, goData("disk", infoBlockSize, 1, 2))...)
	good = append(good, option(optGo, goData("disk", infoBlockSize))...)
	good = append(good, cmd(cmdRead, 0, 1, 0, 4096)...)
	good = append(good, cmd(cmdRead, cmdFlagDF, 2, 1<<20-1, 1)...)
	good = append(good, cmd(cmdBlockStatus, 0, 3, 0, 1<<20)...)
	good = append(good, cmd(cmdBlockStatus, cmdFlagReqOne, 4, 1<<19-1, 2)...)
	good = append(good, cmd(cmdWrite, 0, 5, 0, 3)...)
	good = append(good, 1, 2, 3)
	good = append(good, cmd(cmdTrim, 0, 6, 0, 512)...)
	good = append(good, cmd(cmdDisc, 0, 7, 0, 0)...)
	f.Add(good)
	var old []byte
	old = append(old, clientFlags(flagFixedNewstyle)...)
	old = append(old, option(optExportName, []byte("disk"))...)
	old = append(old, cmd(cmdRead, 0, 1, 1<<20, 1)...)
	old = append(old, cmd(cmdWrite, 0, 2, 0, 0xffffffff)...)
	f.Add(old)
	f.Add(append(clientFlags(0), option(optAbort, nil)...))
	f.Add(append(clientFlags(1), option(optGo, []byte{0, 0, 0, 9, 'd'})...))
	f.Add(append(clientFlags(1), option(optSetMetaCtx, []byte{0, 0, 0, 4, 'd', 'i', 's', 'k', 0xff, 0xff, 0xff, 0xff})...))
	f.Fuzz(func(t *testing.T, in []byte) {
		s, err := New(Options{Export: testExport(), MaxRequest: 256 << 10, MaxBuffered: 512 << 10})
		if err != nil {
			t.Fatal(err)
		}
		pipeSession(t, s, in)
	})
}
