package registry_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"testing"
)

var linkRE = regexp.MustCompile(`^<(/v2/[^>]+)>; rel="next"$`)

// follow GETs path and every page its Link headers lead to, and returns
// the pages' lists (field is "repositories" or "tags") and Link headers.
func follow(t *testing.T, base, path, field string) (pages [][]string, links []string) {
	t.Helper()
	for path != "" {
		if len(pages) > 100 {
			t.Fatalf("more than 100 pages: Link loops? %v", links)
		}
		resp, b := do(t, "GET", base+path, nil, nil)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %d %s", path, resp.StatusCode, b)
		}
		var body map[string]json.RawMessage
		var list []string
		if err := json.Unmarshal(b, &body); err != nil {
			t.Fatalf("GET %s: %v: %s", path, err, b)
		}
		if err := json.Unmarshal(body[field], &list); err != nil || list == nil {
			t.Fatalf("GET %s: no %q list in %s (%v)", path, field, b, err)
		}
		pages = append(pages, list)
		next := ""
		if l := resp.Header.Get("Link"); l != "" {
			links = append(links, l)
			m := linkRE.FindStringSubmatch(l)
			if m == nil {
				t.Fatalf("GET %s: malformed Link %q", path, l)
			}
			next = m[1]
		}
		path = next
	}
	return pages, links
}

func TestCatalogPagination(t *testing.T) {
	n := newNode(t, "")
	// "_catalog" is a valid repository name; its paths are longer than
	// /v2/_catalog, so it stays reachable.
	repos := []string{"zsbak", "vol-1", "Vol-2", "_catalog", "a.b", "vol-10", "m"}
	for _, r := range repos {
		makeChain(t, n.Store, r, 512)
	}
	makeChain(t, n.Store, "multi", 512, 512, 512) // three images, one repository
	want := append(slices.Clone(repos), "multi")
	slices.Sort(want)

	cases := []struct {
		query     string
		wantPages int
	}{
		{"", 1},
		{"?n=1", 8},
		{"?n=3", 3},
		{"?n=4", 2},
		{"?n=8", 1},
		{"?n=1000", 1},
		{"?n=3&last=" + want[1], 2}, // resumes after want[1]
		{"?last=" + want[5], 1},
		{"?last=zzz", 1},
		{"?last=b", 1}, // between two names
	}
	for _, c := range cases {
		t.Run(c.query, func(t *testing.T) {
			pages, links := follow(t, n.HTTP.URL, "/v2/_catalog"+c.query, "repositories")
			if len(pages) != c.wantPages {
				t.Fatalf("%d pages %v, want %d", len(pages), pages, c.wantPages)
			}
			if len(links) != len(pages)-1 {
				t.Fatalf("%d Link headers for %d pages: %v", len(links), len(pages), links)
			}
			var got []string
			for i, p := range pages {
				if i < len(links) {
					wantLink := fmt.Sprintf(`</v2/_catalog?last=%s&n=%d>; rel="next"`, p[len(p)-1], len(p))
					if links[i] != wantLink {
						t.Fatalf("page %d: Link %q, want %q", i, links[i], wantLink)
					}
				}
				got = append(got, p...)
			}
			exp := want
			if i := strings.Index(c.query, "last="); i >= 0 {
				last := c.query[i+len("last="):]
				exp = slices.DeleteFunc(slices.Clone(want), func(s string) bool { return s <= last })
			}
			if !slices.Equal(got, exp) {
				t.Fatalf("repositories %v, want %v", got, exp)
			}
		})
	}

	resp, b := do(t, "GET", n.HTTP.URL+"/v2/_catalog/tags/list", nil, nil)
	if resp.StatusCode != 200 || !strings.Contains(string(b), `"name":"_catalog"`) {
		t.Fatalf("tags of the repository named _catalog: %d %s", resp.StatusCode, b)
	}
}

func TestTagsPagination(t *testing.T) {
	n := newNode(t, "")
	makeChain(t, n.Store, "vol", 512, 512, 512, 512, 512) // tags l0..l4
	pages, links := follow(t, n.HTTP.URL, "/v2/vol/tags/list?n=2", "tags")
	if fmt.Sprint(pages) != "[[l0 l1] [l2 l3] [l4]]" {
		t.Fatalf("pages %v", pages)
	}
	if want := []string{`</v2/vol/tags/list?last=l1&n=2>; rel="next"`, `</v2/vol/tags/list?last=l3&n=2>; rel="next"`}; !slices.Equal(links, want) {
		t.Fatalf("links %q, want %q", links, want)
	}
	// n=0 on tags/list is an empty page (what registries answer and clients
	// expect), not an error.
	resp, b := do(t, "GET", n.HTTP.URL+"/v2/vol/tags/list?n=0", nil, nil)
	if resp.StatusCode != 200 || resp.Header.Get("Link") != "" || !strings.Contains(string(b), `"tags":[]`) {
		t.Fatalf("n=0: %d %q %s", resp.StatusCode, resp.Header.Get("Link"), b)
	}
}

func TestBadPageSize(t *testing.T) {
	n := newNode(t, "")
	makeChain(t, n.Store, "vol", 512)
	cases := []struct{ path, n string }{
		{"/v2/_catalog", "0"},
		{"/v2/_catalog", "-1"},
		{"/v2/_catalog", "abc"},
		{"/v2/_catalog", ""},
		{"/v2/_catalog", "1.5"},
		{"/v2/_catalog", "99999999999999999999999"},
		{"/v2/vol/tags/list", "-3"},
		{"/v2/vol/tags/list", "x"},
	}
	for _, c := range cases {
		t.Run(c.path+"?n="+c.n, func(t *testing.T) {
			resp, b := do(t, "GET", n.HTTP.URL+c.path+"?n="+c.n, nil, nil)
			if resp.StatusCode != http.StatusBadRequest {
				t.Fatalf("status %d, want 400: %s", resp.StatusCode, b)
			}
			if code := errCode(t, b); code != "PAGINATION_NUMBER_INVALID" {
				t.Fatalf("code %s: %s", code, b)
			}
			if !strings.Contains(string(b), "positive integer") || resp.Header.Get("Link") != "" {
				t.Fatalf("unclear error or a Link on an error: %q %s", resp.Header.Get("Link"), b)
			}
		})
	}
}

func TestCatalogEmptyAndAuth(t *testing.T) {
	n := newNode(t, "s3cret")
	hdr := map[string]string{"Authorization": "Bearer s3cret"}
	resp, b := do(t, "GET", n.HTTP.URL+"/v2/_catalog", nil, hdr)
	if resp.StatusCode != 200 || strings.TrimSpace(string(b)) != `{"repositories":[]}` {
		t.Fatalf("empty store: %d %s", resp.StatusCode, b)
	}
	makeChain(t, n.Store, "secret-vm", 512)
	for _, method := range []string{"GET", "HEAD"} {
		resp, b = do(t, method, n.HTTP.URL+"/v2/_catalog", nil, nil)
		if resp.StatusCode != http.StatusUnauthorized || strings.Contains(string(b), "secret-vm") {
			t.Fatalf("%s without credentials: %d %s", method, resp.StatusCode, b)
		}
	}
	resp, b = do(t, "GET", n.HTTP.URL+"/v2/_catalog", nil, hdr)
	if resp.StatusCode != 200 || strings.TrimSpace(string(b)) != `{"repositories":["secret-vm"]}` {
		t.Fatalf("with credentials: %d %s", resp.StatusCode, b)
	}
	resp, _ = do(t, "POST", n.HTTP.URL+"/v2/_catalog", nil, hdr)
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("POST: %d", resp.StatusCode)
	}
}
