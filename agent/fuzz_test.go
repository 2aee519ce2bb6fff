package agent

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"unicode/utf8"

	"imagestore/agent/config"
)

// fuzzPaths are sync routes (and -sync twins) whose request decoding the
// fuzzer drives; the first body byte picks one.
var fuzzPaths = []string{
	"/imagestore/connect/",
	"/imagestore/allocuploaddir/",
	"/imagestore/progress/",
	"/imagestore/job/get/",
	"/imagestore/job/list/",
	"/imagestore/job/cancel/",
	"/imagestore/setquota-sync/",
	"/imagestore/imginfo-sync/",
	"/imagestore/installpath/allocate",
	"/imagestore/gc-sync/",
	"/imagestore/delete-sync/",
	"/imagestore/canceljob-sync/",
	"/imagestore/import/cancel-sync/",
	"/imagestore/getlocalfilesize-sync/",
	"/imagestore/getlocalcachedir-sync/",
	"/imagestore/dumpimagemetadatatofile-sync/",
	"/imagestore/deleteimagesmetadata-sync/",
	"/imagestore/getimagesmetadata-sync/",
	"/imagestore/file/progress",
	"/imagestore/archivedata-sync/",
}

// FuzzDecodeRequest posts arbitrary bodies: the agent never panics and
// always answers a JSON object with success and a clear error on failure.
func FuzzDecodeRequest(f *testing.F) {
	for _, s := range []string{"", "{}", "null", "[]", `{"uuid":"x"}`, `{"uuid":`, `{"expireHour":"5"}`,
		`{"expireHour":-1}`, `{"expireHour":1e300}`, `{"maxCapacity":"1GiB"}`, `{"maxCapacity":null}`,
		`{"taskuuid":"\u0000"}`, `{"installPath":"zstore://../x"}`, `{"parent":"zstore://a/b"}`,
		`{"name":"../../etc"}`, `{"imagesToKeep":["zstore://a/b","http://x/y",7]}`, `{"imagesToKeep":"x"}`,
		`{"imageMetaData":"{\"uuid\":\"a\"}\nx","dumpAllMetaData":false}`, `{"imageUuid":"a"}`,
		`{"cancellationApiId":"a","threadContext":{"api":5}}`, `{"path":"/etc/passwd"}`, `{"path":"../x"}`, "\xff\xfe", `{"uuid":"a"}{"uuid":"b"}`, strings.Repeat("[", 10000)} {
		for i := range fuzzPaths {
			f.Add(uint8(i), []byte(s))
		}
	}
	a, _ := newHTAgent(f, func(c *config.Config) { c.MaxBodyBytes = 1 << 16 })
	h := a.Handler()
	f.Fuzz(func(t *testing.T, pick uint8, body []byte) {
		path := fuzzPaths[int(pick)%len(fuzzPaths)]
		req := httptest.NewRequest(http.MethodPost, path, bytes.NewReader(body))
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != http.StatusOK {
			t.Fatalf("%s %q: status %d", path, body, rec.Code)
		}
		var res map[string]any
		if err := json.Unmarshal(rec.Body.Bytes(), &res); err != nil {
			t.Fatalf("%s %q: reply is not JSON: %v: %q", path, body, err, rec.Body.Bytes())
		}
		ok, isBool := res["success"].(bool)
		msg, isStr := res["error"].(string)
		if !isBool || !isStr {
			t.Fatalf("%s %q: reply lacks success/error: %s", path, body, rec.Body.Bytes())
		}
		if ok != (msg == "") {
			t.Fatalf("%s %q: success=%v with error %q", path, body, ok, msg)
		}
		if !ok && (len(msg) < 5 || !utf8.ValidString(msg)) {
			t.Fatalf("%s %q: unclear error %q", path, body, msg)
		}
		// Malformed JSON is always named as such.
		if !json.Valid(body) && len(bytes.TrimSpace(body)) > 0 && (ok || !strings.Contains(msg, "bad JSON in request body")) {
			t.Fatalf("%s %q: invalid JSON answered %s", path, body, rec.Body.Bytes())
		}
	})
}
