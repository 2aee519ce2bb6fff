// Package jobs runs the agent's asynchronous requests: one Job per
// taskuuid, persisted, cancellable, reported, and its result delivered to
// the management node's callback. Services see a job only through the
// small Progress interface.
package jobs

import "io"

// Progress is what a long operation reports to the job running it.
type Progress interface {
	// SetTotal sets the number of bytes the operation expects to process.
	SetTotal(n int64)
	// Add records n more bytes processed.
	Add(n int64)
	// SetImage names the image worked on, for progress lookups; empty
	// arguments leave the field as it was.
	SetImage(imageUUID, installPath, format string)
}

// Nop is a Progress that records nothing (tools, benchmarks, tests).
type Nop struct{}

func (Nop) SetTotal(int64)                  {}
func (Nop) Add(int64)                       {}
func (Nop) SetImage(string, string, string) {}

// Reader counts the bytes read from r as progress.
func Reader(p Progress, r io.Reader) io.Reader { return progressReader{r, p} }

// ReaderAt counts the bytes read from r as progress.
func ReaderAt(p Progress, r io.ReaderAt) io.ReaderAt { return progressReaderAt{r, p} }

// Writer is an io.Writer that counts what is written to it as progress and
// discards it (for io.MultiWriter or io.TeeReader).
func Writer(p Progress) io.Writer { return progressWriter{p} }

type progressReader struct {
	r io.Reader
	p Progress
}

func (r progressReader) Read(b []byte) (int, error) {
	n, err := r.r.Read(b)
	r.p.Add(int64(n))
	return n, err
}

type progressReaderAt struct {
	r io.ReaderAt
	p Progress
}

func (r progressReaderAt) ReadAt(b []byte, off int64) (int, error) {
	n, err := r.r.ReadAt(b, off)
	r.p.Add(int64(n))
	return n, err
}

type progressWriter struct{ p Progress }

func (w progressWriter) Write(b []byte) (int, error) {
	w.p.Add(int64(len(b)))
	return len(b), nil
}
