package qcow2

import (
	"errors"
	"fmt"
)

var (
	// ErrFormat marks a malformed or hostile image; every *FormatError matches it.
	ErrFormat = errors.New("qcow2: malformed image")
	// ErrUnsupported marks a well-formed image using a feature we refuse
	// (encryption, external data files, extended L2, unknown incompatible bits,
	// dirty images, qcow version 1).
	ErrUnsupported = errors.New("qcow2: unsupported image")
	// ErrNotQcow2 means the bytes do not start with the qcow2 magic.
	ErrNotQcow2 = errors.New("qcow2: not a qcow2 image")
)

// FormatError says which header field or table entry is malformed and why.
type FormatError struct {
	Field  string
	Reason string
}

func (e *FormatError) Error() string {
	return fmt.Sprintf("qcow2: malformed image: %s: %s", e.Field, e.Reason)
}

// Is makes errors.Is(err, ErrFormat) true for every FormatError.
func (e *FormatError) Is(target error) bool { return target == ErrFormat }

func formatErr(field, format string, args ...any) error {
	return &FormatError{Field: field, Reason: fmt.Sprintf(format, args...)}
}

func unsupported(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrUnsupported, fmt.Sprintf(format, args...))
}
