// Package countio counts the bytes that pass through a writer, for
// callers that must report how much they wrote through layers of buffering.
package countio

import "io"

// Writer passes writes to W and adds what W accepted to N.
type Writer struct {
	W io.Writer
	N int64
}

func (c *Writer) Write(p []byte) (int, error) {
	n, err := c.W.Write(p)
	c.N += int64(n)
	return n, err
}
