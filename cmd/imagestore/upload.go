package main

import (
	"context"
	"errors"
)

func cmdUpload(ctx context.Context, g *globals, args []string) error {
	return errors.New("upload: not implemented yet")
}
