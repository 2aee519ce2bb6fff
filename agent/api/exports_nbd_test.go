package api

import (
	"encoding/json"
	"strings"
	"testing"
)

// The export and NBD bodies keep their wire names; integers are numbers
// and the key fields appear only with a key.
func TestExportAndNBDJSON(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		v    any
		want string
	}{
		{ExportReply{ImgURL: "/export/image-0123456789abcdef0123456789abcdef.raw", MD5Sum: "m", Size: 10, Format: "raw"},
			`{"imgUrl":"/export/image-0123456789abcdef0123456789abcdef.raw","md5Sum":"m","size":10,"format":"raw"}`},
		{DeleteExportReply{Deleted: 2}, `{"deleted":2}`},
		{ExportNBDImageReply{ImagePaths: []string{"/t/a"}, Ports: []int{10800}, NBDDescription: "nbd-1", TLS: true},
			`{"imagePaths":["/t/a"],"ports":[10800],"nbdDescription":"nbd-1","tls":true}`},
		{RemoteTargetReply{TargetURI: "nbd://h:1/e", Port: 1, ExportName: "e", InstallPath: "zstore://a/b", NBDKey: NBDKey{PSKIdentity: "imagestore", PSK: "k"}},
			`{"targetUri":"nbd://h:1/e","port":1,"exportName":"e","installPath":"zstore://a/b","tls":false,"pskIdentity":"imagestore","psk":"k"}`},
		{CancelNBDImageReply{}, `{"cancelled":false}`},
		{DeleteRemoteTargetReply{Deleted: 1}, `{"deleted":1}`},
	} {
		b, err := json.Marshal(tc.v)
		if err != nil || string(b) != tc.want {
			t.Errorf("%T: %s %v\nwant %s", tc.v, b, err, tc.want)
		}
	}
}

func TestExportAndNBDValidate(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		body string
		req  interface{ Validate() error }
		want string // "" = valid
	}{
		{`{"installPath":"zstore://a/b","extFmt":"raw"}`, &ExportRequest{}, ""},
		{`{"imgUrl":"http://h/exports/t/f"}`, &ExportRequest{}, ""},
		{`{}`, &ExportRequest{}, "missing field installPath"},
		{`{"installPath":"zstore://a/b","extFmt":"vmdk"}`, &ExportRequest{}, `extFmt "vmdk" not supported`},
		{`{"workspace":"/u","sizes":[1048576,"2097152",1.0E6]}`, &ExportNBDImageRequest{}, ""},
		{`{"workspace":"/u"}`, &ExportNBDImageRequest{}, "missing field sizes"},
		{`{"sizes":[1]}`, &ExportNBDImageRequest{}, "missing field workspace"},
		{`{"workspace":"/u","sizes":[1,0]}`, &ExportNBDImageRequest{}, "sizes[1] = 0: must be positive"},
		{`{"workspace":"/u","sizes":[1],"expireHour":-1}`, &ExportNBDImageRequest{}, "expireHour -1 is negative"},
		{`{}`, &CancelNBDImageRequest{}, "missing field nbdDescription"},
		{`{"installPath":"zstore://a/b","remoteTargetType":"nbd"}`, &RemoteTargetRequest{}, ""},
		{`{"installPath":"zstore://a/b","remoteTargetType":"iSCSI"}`, &RemoteTargetRequest{}, "not supported"},
		{`{"installPath":"zstore://a/b","hostname":"a/b"}`, &RemoteTargetRequest{}, "not a host name"},
		{`{}`, &DeleteRemoteTargetRequest{}, "missing field targetUri"},
		{`{"installPath":"zstore://a/b"}`, &DeleteRemoteTargetRequest{}, ""},
		{`{"targetUri":"http://x/y"}`, &DeleteRemoteTargetRequest{}, "not an nbd://"},
		{`{"targetUri":"nbd://h/e"}`, &DeleteRemoteTargetRequest{}, "not an nbd://"},
	} {
		if err := json.Unmarshal([]byte(tc.body), tc.req); err != nil {
			t.Fatalf("%s: %v", tc.body, err)
		}
		err := tc.req.Validate()
		if (tc.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%T %s: %v, want %q", tc.req, tc.body, err, tc.want)
		}
	}
}
