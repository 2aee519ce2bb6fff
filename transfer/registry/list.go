package registry

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"sort"
	"strconv"

	"imagestore/transfer/oci"
)

// codePaginationNumberInvalid is the Docker registry API's code for a bad
// ?n=; the OCI spec has none of its own.
const codePaginationNumberInvalid = "PAGINATION_NUMBER_INVALID"

// paginate cuts one page out of a lexically sorted list per the
// distribution API: the entries after ?last=, at most ?n= of them. When
// more remain it sets the Link header to the next page under path. A
// malformed or negative n is answered 400 here (ok false); n=0 is too
// unless zeroOK, in which case it yields an empty page (what clients of
// tags/list expect).
func paginate(w http.ResponseWriter, r *http.Request, items []string, path string, zeroOK bool) (page []string, ok bool) {
	q := r.URL.Query()
	if last := q.Get("last"); last != "" {
		i := sort.SearchStrings(items, last)
		if i < len(items) && items[i] == last {
			i++
		}
		items = items[i:]
	}
	if !q.Has("n") {
		return items, true
	}
	n, err := strconv.Atoi(q.Get("n"))
	if err != nil || n < 0 || (n == 0 && !zeroOK) {
		writeError(w, http.StatusBadRequest, codePaginationNumberInvalid,
			"n must be a positive integer (the page size)", q.Get("n"))
		return nil, false
	}
	if n >= len(items) {
		return items, true
	}
	page = items[:n]
	if n > 0 {
		next := url.Values{"last": {page[n-1]}, "n": {strconv.Itoa(n)}}
		w.Header().Set("Link", fmt.Sprintf(`<%s?%s>; rel="next"`, path, next.Encode()))
	}
	return page, true
}

func (s *Server) serveTags(w http.ResponseWriter, r *http.Request, name string) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		methodNotAllowed(w, "GET, HEAD")
		return
	}
	imgs, err := s.st.ListImages(r.Context(), name)
	if err != nil {
		storeError(w, err, oci.CodeNameUnknown)
		return
	}
	tags := make([]string, 0, len(imgs))
	for _, img := range imgs {
		tags = append(tags, img.ID)
	}
	if len(tags) == 0 {
		writeError(w, http.StatusNotFound, oci.CodeNameUnknown, "repository has no images", name)
		return
	}
	sort.Strings(tags)
	tags, ok := paginate(w, r, tags, "/v2/"+name+"/tags/list", true)
	if !ok {
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(struct {
		Name string   `json:"name"`
		Tags []string `json:"tags"`
	}{name, tags})
}

// serveCatalog lists the repositories: every image name with at least one
// record. Records are read from disk on each call; a store holds thousands
// of images, not millions.
func (s *Server) serveCatalog(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		methodNotAllowed(w, "GET, HEAD")
		return
	}
	imgs, err := s.st.ListImages(r.Context(), "")
	if err != nil {
		storeError(w, err, oci.CodeUnsupported)
		return
	}
	seen := map[string]bool{}
	repos := []string{}
	for _, img := range imgs {
		if !seen[img.Name] {
			seen[img.Name] = true
			repos = append(repos, img.Name)
		}
	}
	sort.Strings(repos)
	repos, ok := paginate(w, r, repos, "/v2/_catalog", false)
	if !ok {
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(struct {
		Repositories []string `json:"repositories"`
	}{repos})
}
