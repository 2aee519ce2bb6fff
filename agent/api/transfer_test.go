package api

import (
	"encoding/json"
	"strings"
	"testing"
)

// The host transfer bodies keep their wire names; integers are numbers.
func TestTransferJSON(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		v    any
		want string
	}{
		{PullFromHostRequest{
			HostLogin: HostLogin{Hostname: "kvm1", SSHPort: 2222, Username: "root", PrivateKey: "K", HostKeyFingerprint: "SHA256:x"},
			Path:      "/v.qcow2", Parent: "zstore://a/b", Name: "a", ID: "c", InstallPath: "zstore://a/c", Desc: "d",
			VolumeReadBandwidth: 1 << 20, NetworkReadBandwidth: 2 << 20, Parallelism: 4,
		}, `{"hostname":"kvm1","sshPort":2222,"username":"root","password":"","privateKey":"K","hostKeyFingerprint":"SHA256:x",` +
			`"path":"/v.qcow2","parent":"zstore://a/b","name":"a","id":"c","installPath":"zstore://a/c","desc":"d",` +
			`"volumeReadBandwidth":1048576,"networkReadBandwidth":2097152,"parallelism":4}`},
		{PullFromHostReply{
			ImportReply:   ImportReply{Capacity: Capacity{TotalSize: 100, FreeSize: 40}, Name: "a", ID: "c", Blobsum: "sha256:x", Size: 7, VirtualSize: 16, Format: "qcow2", InstallPath: "zstore://a/c"},
			HostBytesRead: 9, AllocatedBytes: 8,
		}, `{"totalSize":100,"freeSize":40,"name":"a","id":"c","blobsum":"sha256:x","size":7,"virtualsize":16,"format":"qcow2",` +
			`"installPath":"zstore://a/c","hostBytesRead":9,"allocatedBytes":8}`},
		{WriteToHostRequest{HostLogin: HostLogin{Hostname: "kvm1", Username: "root", Password: "pw"}, InstallPath: "zstore://a/c", Path: "/r.raw", Format: "raw", RecoverBandwidth: 5},
			`{"hostname":"kvm1","sshPort":0,"username":"root","password":"pw","privateKey":"","hostKeyFingerprint":"",` +
				`"installPath":"zstore://a/c","path":"/r.raw","format":"raw","recoverBandwidth":5}`},
		{WriteToHostReply{InstallPath: "zstore://a/c", Hostname: "kvm1", Path: "/r.raw", Format: "raw", Size: 16, VirtualSize: 16, SHA256: "s"},
			`{"installPath":"zstore://a/c","hostname":"kvm1","path":"/r.raw","format":"raw","size":16,"virtualsize":16,"sha256":"s"}`},
	} {
		b, err := json.Marshal(tc.v)
		if err != nil || string(b) != tc.want {
			t.Errorf("%T: %s %v\nwant %s", tc.v, b, err, tc.want)
		}
	}
}

func TestTransferValidate(t *testing.T) {
	t.Parallel()
	const login = `"hostname":"kvm1","username":"root","privateKey":"K"`
	for _, tc := range []struct {
		body string
		req  interface{ Validate() error }
		want string // "" = valid
	}{
		{`{` + login + `,"path":"/v","name":"a"}`, &PullFromHostRequest{}, ""},
		{`{` + login + `,"path":"/v","parent":"zstore://a/b","parallelism":64}`, &PullFromHostRequest{}, ""},
		{`{"username":"root","privateKey":"K","path":"/v","name":"a"}`, &PullFromHostRequest{}, "missing field hostname"},
		{`{"hostname":"kvm1","privateKey":"K","path":"/v","name":"a"}`, &PullFromHostRequest{}, "missing field username"},
		{`{"hostname":"kvm1","username":"root","path":"/v","name":"a"}`, &PullFromHostRequest{}, "missing field password or privateKey"},
		{`{` + login + `,"sshPort":70000,"path":"/v","name":"a"}`, &PullFromHostRequest{}, "sshPort 70000 out of range"},
		{`{` + login + `,"hostKeyFingerprint":"MD5:x","path":"/v","name":"a"}`, &PullFromHostRequest{}, "SHA256:... form"},
		{`{` + login + `,"name":"a"}`, &PullFromHostRequest{}, "missing field path"},
		{`{` + login + `,"path":"/v"}`, &PullFromHostRequest{}, "missing field name"},
		{`{` + login + `,"path":"/v","name":"a","volumeReadBandwidth":-1}`, &PullFromHostRequest{}, "must not be negative"},
		{`{` + login + `,"path":"/v","name":"a","parallelism":-1}`, &PullFromHostRequest{}, "parallelism -1 is negative"},
		{`{` + login + `,"installPath":"zstore://a/b","path":"/r"}`, &WriteToHostRequest{}, ""},
		{`{` + login + `,"path":"/r"}`, &WriteToHostRequest{}, "missing field installPath"},
		{`{` + login + `,"installPath":"zstore://a/b"}`, &WriteToHostRequest{}, "missing field path"},
		{`{` + login + `,"installPath":"zstore://a/b","path":"/r","format":"vmdk"}`, &WriteToHostRequest{}, `format "vmdk": want qcow2 or raw`},
		{`{` + login + `,"installPath":"zstore://a/b","path":"/r","recoverBandwidth":-5}`, &WriteToHostRequest{}, "recoverBandwidth must not be negative"},
		{`{"installPath":"zstore://a/b","path":"/r"}`, &WriteToHostRequest{}, "missing field hostname"},
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
