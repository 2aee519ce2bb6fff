package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/opencontainers/go-digest"

	"imagestore/agent/api"
	"imagestore/blobstore"
	"imagestore/transfer/imageconfig"
	"imagestore/transfer/oci"
)

// remoteImage is an image as the store's registry describes it: its
// manifest and the records of its chain (base first).
type remoteImage struct {
	Ref      blobstore.Ref
	Manifest oci.Manifest
	Chain    []blobstore.Image
}

func (r *remoteImage) Top() blobstore.Image { return r.Chain[len(r.Chain)-1] }

// openImage is the start of every command on one stored image: parse the
// name:id argument, connect, and fetch its manifest and chain. The caller
// closes the client's idle connections.
func (g *globals) openImage(ctx context.Context, arg string) (*oci.Client, *remoteImage, error) {
	ref, err := parseImageArg(arg)
	if err != nil {
		return nil, nil, usageErr("%v", err)
	}
	c, err := g.client()
	if err != nil {
		return nil, nil, err
	}
	ri, err := fetchImage(ctx, c, ref)
	if err != nil {
		c.CloseIdleConnections()
		return nil, nil, err
	}
	return c, ri, nil
}

// fetchImage reads name:id's manifest and config and checks that they
// describe one consistent chain ending at ref.
func fetchImage(ctx context.Context, c *oci.Client, ref blobstore.Ref) (*remoteImage, error) {
	mb, _, err := c.GetManifest(ctx, ref.Name, ref.ID)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", ref, err)
	}
	m, err := oci.ParseManifest(mb)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", ref, err)
	}
	cb, err := c.FetchSmallBlob(ctx, ref.Name, m.Config.Digest, oci.MaxManifestSize)
	if err != nil {
		return nil, fmt.Errorf("image %s: config: %w", ref, err)
	}
	cfg, err := imageconfig.ParseConfig(cb)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", ref, err)
	}
	if _, err := imageconfig.Validate(m, cfg, ref.Name, ref.ID); err != nil {
		return nil, fmt.Errorf("image %s: %w", ref, err)
	}
	return &remoteImage{Ref: ref, Manifest: m, Chain: cfg.Chain}, nil
}

func layerMediaType(img blobstore.Image) string {
	if img.Format == "qcow2" {
		return oci.MediaTypeQcow2Layer
	}
	return oci.MediaTypeBlobLayer
}

// putImage records chain (base first; every blob already on the store) by
// uploading its config blob and its manifest under the top's name:id.
func putImage(ctx context.Context, c *oci.Client, chain []blobstore.Image) error {
	top := chain[len(chain)-1]
	cfg, err := json.Marshal(imageconfig.Config{Imagestore: imageconfig.ConfigVersion, Chain: chain})
	if err != nil {
		return err
	}
	cd := digest.FromBytes(cfg)
	m := oci.Manifest{
		SchemaVersion: 2,
		MediaType:     oci.MediaTypeManifest,
		Config:        oci.Descriptor{MediaType: oci.MediaTypeConfig, Digest: cd, Size: int64(len(cfg))},
	}
	for _, img := range chain {
		m.Layers = append(m.Layers, oci.Descriptor{MediaType: layerMediaType(img), Digest: img.Blob, Size: img.Size})
	}
	mb, err := json.Marshal(m)
	if err != nil {
		return err
	}
	if _, err := c.StatBlob(ctx, top.Name, cd); err != nil {
		if !errors.Is(err, oci.ErrNotFound) {
			return fmt.Errorf("config blob: %w", err)
		}
		if err := c.PutBlob(ctx, top.Name, cd, cfg); err != nil {
			return fmt.Errorf("config blob: %w", err)
		}
	}
	if _, err := c.PutManifest(ctx, top.Name, top.ID, oci.MediaTypeManifest, mb); err != nil {
		return fmt.Errorf("manifest %s: %w", top.Ref, err)
	}
	return nil
}

func infoOf(img blobstore.Image) api.ImageInfo { return img.Info() }

func printInfo(w io.Writer, in api.ImageInfo) {
	fmt.Fprintf(w, "%s:%s\n", in.Name, in.ID)
	fmt.Fprintf(w, "  parent:      %s\n", in.Parent)
	fmt.Fprintf(w, "  blobsum:     %s\n", in.Blobsum)
	fmt.Fprintf(w, "  created:     %s\n", in.Created.Format(time.RFC3339))
	fmt.Fprintf(w, "  format:      %s\n", in.Format)
	fmt.Fprintf(w, "  size:        %d (%s)\n", in.Size, human(in.Size))
	fmt.Fprintf(w, "  virtualsize: %d (%s)\n", in.VirtualSize, human(in.VirtualSize))
	if in.Desc != "" {
		fmt.Fprintf(w, "  desc:        %s\n", in.Desc)
	}
}

func cmdInfo(ctx context.Context, g *globals, args []string) error {
	fs := g.subFlags("info")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageErr("info name:id")
	}
	c, ri, err := g.openImage(ctx, pos[0])
	if err != nil {
		return err
	}
	defer c.CloseIdleConnections()
	in := infoOf(ri.Top())
	if g.face == faceZstcli {
		// The cloud sizes a volume for pull from size: the chain's stored
		// bytes bound what a flattened pull writes.
		in.Size = 0
		for _, img := range ri.Chain {
			in.Size += img.Size
		}
		if g.json {
			return g.printJSONLine(in)
		}
	}
	return g.printResult(in, func(w io.Writer) { printInfo(w, in) })
}

func cmdImages(ctx context.Context, g *globals, args []string) error {
	fs := g.subFlags("images")
	name := fs.String("name", "", "repository name (an image or volume uuid, or zsbak); none = every image")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) == 1 && *name == "" {
		*name = pos[0]
	} else if len(pos) != 0 {
		return usageErr("images [-name NAME]")
	}
	if *name == "" && g.face == faceZstcli {
		return usageErr("images -name NAME")
	}
	if *name != "" {
		if err := blobstore.ValidateName(*name); err != nil {
			return usageErr("-name: %v", err)
		}
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	defer c.CloseIdleConnections()
	names := []string{*name}
	if *name == "" {
		if names, err = c.Catalog(ctx); err != nil {
			return err
		}
	}
	infos := []api.ImageInfo{}
	for _, n := range names {
		got, err := listImages(ctx, c, n, 0)
		if err != nil {
			return err
		}
		infos = append(infos, got...)
	}
	if g.face == faceZstcli {
		return g.printJSONLine(infos) // a bare array, [] when empty
	}
	reply := api.ListImagesReply{Infos: infos}
	return g.printResult(reply, func(w io.Writer) {
		for _, in := range reply.Infos {
			fmt.Fprintf(w, "%s:%s\t%s\t%d\t%d\t%s\n", in.Name, in.ID, in.Created.Format(time.RFC3339), in.Size, in.VirtualSize, in.Parent)
		}
	})
}

// newID returns n random bytes as hex.
func newID(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
