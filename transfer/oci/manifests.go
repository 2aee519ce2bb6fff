package oci

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/opencontainers/go-digest"
)

// HeadManifest returns the descriptor of a manifest; ErrNotFound if none.
func (c *Client) HeadManifest(ctx context.Context, name, ref string) (Descriptor, error) {
	ctx, cancel := c.quick(ctx)
	defer cancel()
	resp, err := c.do(ctx, http.MethodHead, c.url("/v2/"+name+"/manifests/"+ref), nil, http.Header{"Accept": {MediaTypeManifest}})
	if err != nil {
		return Descriptor{}, err
	}
	defer drain(resp)
	if resp.StatusCode != http.StatusOK {
		return Descriptor{}, &Error{Method: http.MethodHead, URL: resp.Request.URL.Redacted(), Status: resp.StatusCode}
	}
	d, err := digest.Parse(resp.Header.Get(HeaderContentDigest))
	if err != nil {
		return Descriptor{}, fmt.Errorf("oci: manifest %s:%s: bad %s: %w", name, ref, HeaderContentDigest, err)
	}
	return Descriptor{MediaType: resp.Header.Get("Content-Type"), Digest: d, Size: resp.ContentLength}, nil
}

// GetManifest fetches a manifest's bytes (at most MaxManifestSize).
func (c *Client) GetManifest(ctx context.Context, name, ref string) ([]byte, Descriptor, error) {
	resp, err := c.do(ctx, http.MethodGet, c.url("/v2/"+name+"/manifests/"+ref), nil, http.Header{"Accept": {MediaTypeManifest}})
	if err != nil {
		return nil, Descriptor{}, err
	}
	if err := expect(resp, http.StatusOK); err != nil {
		return nil, Descriptor{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, MaxManifestSize+1))
	if err != nil {
		return nil, Descriptor{}, err
	}
	if len(b) > MaxManifestSize {
		return nil, Descriptor{}, fmt.Errorf("%w: manifest over %d bytes", ErrTooLarge, MaxManifestSize)
	}
	d := digest.FromBytes(b)
	if h := resp.Header.Get(HeaderContentDigest); h != "" && h != d.String() {
		return nil, Descriptor{}, fmt.Errorf("%w: manifest %s:%s digest %s, header says %s", ErrDigestInvalid, name, ref, d, h)
	}
	if strings.HasPrefix(ref, "sha256:") && ref != d.String() {
		return nil, Descriptor{}, fmt.Errorf("%w: manifest %s digest %s", ErrDigestInvalid, ref, d)
	}
	return b, Descriptor{MediaType: resp.Header.Get("Content-Type"), Digest: d, Size: int64(len(b))}, nil
}

// FetchSmallBlob reads a blob of at most max bytes and verifies its digest.
func (c *Client) FetchSmallBlob(ctx context.Context, name string, d digest.Digest, max int64) ([]byte, error) {
	rc, err := c.GetBlob(ctx, name, d, 0, -1)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("%w: blob %s over %d bytes", ErrTooLarge, d, max)
	}
	if got := digest.FromBytes(b); got != d {
		return nil, fmt.Errorf("%w: blob %s hashes to %s", ErrDigestInvalid, d, got)
	}
	return b, nil
}

// PutManifest uploads a manifest under ref (a tag or its digest). Its
// answer may take up to ManifestTimeout (the store checks the new layers
// first); every other request has HeaderTimeout.
func (c *Client) PutManifest(ctx context.Context, name, ref, mediaType string, body []byte) (digest.Digest, error) {
	resp, err := c.send(ctx, c.manifestHC, http.MethodPut, c.url("/v2/"+name+"/manifests/"+ref), bytes.NewReader(body), http.Header{"Content-Type": {mediaType}})
	if err != nil {
		return "", err
	}
	if err := expect(resp, http.StatusCreated); err != nil {
		return "", err
	}
	drain(resp)
	return digest.FromBytes(body), nil
}

// Tags lists the tags of a repository.
func (c *Client) Tags(ctx context.Context, name string) ([]string, error) {
	resp, err := c.do(ctx, http.MethodGet, c.url("/v2/"+name+"/tags/list"), nil, nil)
	if err != nil {
		return nil, err
	}
	if err := expect(resp, http.StatusOK); err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var tl struct {
		Name string   `json:"name"`
		Tags []string `json:"tags"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, MaxManifestSize)).Decode(&tl); err != nil {
		return nil, fmt.Errorf("oci: tags of %s: %w", name, err)
	}
	return tl.Tags, nil
}

// DeleteManifest deletes name:ref (the image record the manifest was
// rendered from). A refusal (the image is another's parent) is an *Error
// with the server's message.
func (c *Client) DeleteManifest(ctx context.Context, name, ref string) error {
	resp, err := c.do(ctx, http.MethodDelete, c.url("/v2/"+name+"/manifests/"+ref), nil, nil)
	if err != nil {
		return err
	}
	if err := expect(resp, http.StatusAccepted, http.StatusOK); err != nil {
		return err
	}
	drain(resp)
	return nil
}

// Catalog lists every repository (image name) of the registry, sorted,
// asking for pages of catalogPage names.
func (c *Client) Catalog(ctx context.Context) ([]string, error) {
	const catalogPage = 1000
	var all []string
	last := ""
	for {
		q := url.Values{"n": {strconv.Itoa(catalogPage)}}
		if last != "" {
			q.Set("last", last)
		}
		resp, err := c.do(ctx, http.MethodGet, c.url("/v2/_catalog?"+q.Encode()), nil, nil)
		if err != nil {
			return nil, err
		}
		if err := expect(resp, http.StatusOK); err != nil {
			return nil, err
		}
		var page struct {
			Repositories []string `json:"repositories"`
		}
		err = json.NewDecoder(io.LimitReader(resp.Body, MaxManifestSize)).Decode(&page)
		drain(resp)
		if err != nil {
			return nil, fmt.Errorf("oci: catalog: %w", err)
		}
		all = append(all, page.Repositories...)
		if len(page.Repositories) < catalogPage {
			return all, nil
		}
		last = page.Repositories[len(page.Repositories)-1]
	}
}
