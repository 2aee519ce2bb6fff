package blobstore

import (
	"errors"
	"fmt"
	"strings"
)

// ErrInvalidName is returned (wrapped) when a caller-supplied name, id or
// install path could escape the store or is otherwise unusable.
var ErrInvalidName = errors.New("invalid name")

// MaxNameLen bounds names and ids; they become file names.
const MaxNameLen = 128

// InstallPathScheme prefixes install paths: zstore://<name>/<id>.
const InstallPathScheme = "zstore://"

// Ref names an image: Name is a namespace (a volume or image uuid, or
// "zsbak" for database backups), ID identifies one image inside it.
type Ref struct {
	Name string `json:"name"`
	ID   string `json:"id"`
}

// String renders "name:id".
func (r Ref) String() string { return r.Name + ":" + r.ID }

// InstallPath renders "zstore://name/id".
func (r Ref) InstallPath() string { return InstallPathScheme + r.Name + "/" + r.ID }

// IsZero reports whether r is the empty reference.
func (r Ref) IsZero() bool { return r.Name == "" && r.ID == "" }

// Validate checks both parts with ValidateName.
func (r Ref) Validate() error {
	if err := ValidateName(r.Name); err != nil {
		return fmt.Errorf("image name: %w", err)
	}
	if err := ValidateName(r.ID); err != nil {
		return fmt.Errorf("image id: %w", err)
	}
	return nil
}

// ValidateName accepts 1..MaxNameLen characters from [A-Za-z0-9._-],
// not starting with a dot, so a name is always one safe path component.
func ValidateName(s string) error {
	switch {
	case s == "":
		return fmt.Errorf("%w: empty", ErrInvalidName)
	case len(s) > MaxNameLen:
		return fmt.Errorf("%w: %d bytes, at most %d allowed", ErrInvalidName, len(s), MaxNameLen)
	case s[0] == '.':
		return fmt.Errorf("%w: %q starts with a dot", ErrInvalidName, s)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.'
		if !ok {
			return fmt.Errorf("%w: %q has character %q at byte %d (allowed: letters, digits, '.', '_', '-')", ErrInvalidName, s, c, i)
		}
	}
	return nil
}

// ParseRef parses "name:id".
func ParseRef(s string) (Ref, error) {
	name, id, ok := strings.Cut(s, ":")
	if !ok {
		return Ref{}, fmt.Errorf("%w: %q is not of the form name:id", ErrInvalidName, s)
	}
	r := Ref{Name: name, ID: id}
	return r, r.Validate()
}

// ParseInstallPath parses "zstore://name/id".
func ParseInstallPath(s string) (Ref, error) {
	rest, ok := strings.CutPrefix(s, InstallPathScheme)
	if !ok {
		return Ref{}, fmt.Errorf("%w: install path %q does not start with %s", ErrInvalidName, s, InstallPathScheme)
	}
	name, id, ok := strings.Cut(rest, "/")
	if !ok {
		return Ref{}, fmt.Errorf("%w: install path %q is not of the form %sname/id", ErrInvalidName, s, InstallPathScheme)
	}
	r := Ref{Name: name, ID: id}
	return r, r.Validate()
}
