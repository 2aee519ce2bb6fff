package config

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"imagestore/internal/testcert"
)

// s3Config is a valid type s3 configuration.
func s3Config() Config {
	c, _ := Defaults(ProfileImagestore)
	c.Storage = Storage{Type: StorageS3, Endpoint: "https://rgw.example:7480", Bucket: "backups", PathStyle: true}
	return c
}

func envMap(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

func writeCreds(t *testing.T, body string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "s3.credentials")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestStorageLoad: the storage section and its IMAGESTORE_STORAGE_*
// overrides load; gcGrace defaults by storage type unless set.
func TestStorageLoad(t *testing.T) {
	clearEnv(t)
	if d := Default(); d.Storage.Type != "" || d.Storage.IsS3() || d.GCGrace != DefaultLocalGCGrace {
		t.Fatalf("default storage %+v, gcGrace %v", d.Storage, d.GCGrace)
	}
	s3yaml := `storage:
  type: s3
  endpoint: https://rgw.example:7480
  bucket: backups
  prefix: site-a
  region: eu-1
  pathStyle: true
  credentialsFile: /etc/imagestore/s3.credentials
  credentialsProfile: store
  caFile: /etc/imagestore/rgw-ca.pem
  partSize: 32MiB
  cacheBytes: 1GiB
`
	c, err := Load(writeConfigFile(t, s3yaml))
	if err != nil {
		t.Fatal(err)
	}
	want := Storage{Type: StorageS3, Endpoint: "https://rgw.example:7480", Bucket: "backups", Prefix: "site-a", Region: "eu-1",
		PathStyle: true, CredentialsFile: "/etc/imagestore/s3.credentials", CredentialsProfile: "store",
		CAFile: "/etc/imagestore/rgw-ca.pem", PartSize: 32 << 20, CacheBytes: 1 << 30}
	if c.Storage != want {
		t.Fatalf("storage %+v\nwant    %+v", c.Storage, want)
	}
	if c.GCGrace != DefaultS3GCGrace {
		t.Fatalf("gcGrace on s3 without a setting: %v, want %v", c.GCGrace, DefaultS3GCGrace)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name string
		file string
		env  map[string]string
		want time.Duration
	}{
		{"local default", "", nil, DefaultLocalGCGrace},
		{"s3 default", s3yaml, nil, DefaultS3GCGrace},
		{"s3 from env", "", map[string]string{"IMAGESTORE_STORAGE_TYPE": "s3"}, DefaultS3GCGrace},
		{"file setting wins on s3", s3yaml + "gcGrace: 2h\n", nil, 2 * time.Hour},
		{"env setting wins", s3yaml + "gcGrace: 2h\n", map[string]string{"IMAGESTORE_GC_GRACE": "30m"}, 30 * time.Minute},
		{"0 means the type's default", "gcGrace: 0s\n", nil, DefaultLocalGCGrace},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			c, err := Load(writeConfigFile(t, tc.file))
			if err != nil {
				t.Fatal(err)
			}
			if c.GCGrace != tc.want {
				t.Fatalf("gcGrace %v, want %v", c.GCGrace, tc.want)
			}
		})
	}

	env := map[string]string{
		"IMAGESTORE_STORAGE_TYPE": "s3", "IMAGESTORE_STORAGE_ENDPOINT": "http://127.0.0.1:7480",
		"IMAGESTORE_STORAGE_BUCKET": "b2", "IMAGESTORE_STORAGE_PREFIX": "p2", "IMAGESTORE_STORAGE_REGION": "r2",
		"IMAGESTORE_STORAGE_PATH_STYLE": "false", "IMAGESTORE_STORAGE_CREDENTIALS_FILE": "/c2",
		"IMAGESTORE_STORAGE_CA_FILE": "/ca2", "IMAGESTORE_STORAGE_PART_SIZE": "64MiB", "IMAGESTORE_STORAGE_CACHE_BYTES": "8MiB",
	}
	for k, v := range env {
		t.Setenv(k, v)
	}
	c, err = Load(writeConfigFile(t, s3yaml))
	if err != nil {
		t.Fatal(err)
	}
	want = Storage{Type: StorageS3, Endpoint: "http://127.0.0.1:7480", Bucket: "b2", Prefix: "p2", Region: "r2",
		CredentialsFile: "/c2", CredentialsProfile: "store", CAFile: "/ca2", PartSize: 64 << 20, CacheBytes: 8 << 20}
	if c.Storage != want {
		t.Fatalf("env over file: %+v\nwant %+v", c.Storage, want)
	}
	t.Setenv("IMAGESTORE_STORAGE_PATH_STYLE", "sometimes")
	if _, err := Load(""); err == nil || !strings.Contains(err.Error(), "IMAGESTORE_STORAGE_PATH_STYLE") {
		t.Fatalf("bad IMAGESTORE_STORAGE_PATH_STYLE: %v", err)
	}
	if _, err := Load(writeConfigFile(t, "storage:\n  type: s3\n  secretKey: x\n")); err == nil || !strings.Contains(err.Error(), "secretKey") {
		t.Fatalf("keys in the file must be refused (they belong in credentialsFile): %v", err)
	}
}

func TestStorageValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		mod  func(*Storage)
		want string // "" = valid
	}{
		{"s3", func(*Storage) {}, ""},
		{"s3 http with prefix", func(s *Storage) { s.Endpoint = "http://127.0.0.1:7480"; s.Prefix = "a/b/" }, ""},
		{"s3 part size", func(s *Storage) { s.PartSize = 64 << 20 }, ""},
		{"local explicit", func(s *Storage) { *s = Storage{Type: StorageLocal} }, ""},
		{"unknown type", func(s *Storage) { s.Type = "ceph" }, `storage.type: "ceph", want local or s3`},
		{"no bucket", func(s *Storage) { s.Bucket = "" }, "storage.bucket: empty"},
		{"no endpoint", func(s *Storage) { s.Endpoint = "" }, "storage.endpoint: empty"},
		{"endpoint not a URL", func(s *Storage) { s.Endpoint = "rgw.example:7480" }, "storage.endpoint: not an http:// or https:// URL"},
		{"endpoint ftp", func(s *Storage) { s.Endpoint = "ftp://rgw" }, "not an http:// or https:// URL"},
		{"endpoint with keys", func(s *Storage) { s.Endpoint = "https://AK:SK@rgw.example" }, "storage.endpoint: holds credentials"},
		{"endpoint query", func(s *Storage) { s.Endpoint = "https://rgw.example/?x=1" }, "query"},
		{"ca with http", func(s *Storage) { s.Endpoint = "http://rgw"; s.CAFile = "/ca.pem" }, "storage.caFile is set but storage.endpoint is http://"},
		{"prefix dotdot", func(s *Storage) { s.Prefix = "a/../b" }, "storage.prefix"},
		{"prefix empty component", func(s *Storage) { s.Prefix = "a//b" }, "storage.prefix"},
		{"part too small", func(s *Storage) { s.PartSize = 1 << 20 }, "storage.partSize: 1048576, want 5 MiB to 5 GiB"},
		{"part too large", func(s *Storage) { s.PartSize = 6 << 30 }, "storage.partSize"},
		{"profile without file", func(s *Storage) { s.CredentialsProfile = "x" }, "storage.credentialsProfile is set without storage.credentialsFile"},
		{"bucket on local", func(s *Storage) { s.Type = "" }, "storage.endpoint is set but storage.type is local: set storage.type: s3"},
		{"ca on local", func(s *Storage) { *s = Storage{CAFile: "/ca.pem"} }, "storage.caFile is set but storage.type is local"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := s3Config()
			tc.mod(&c.Storage)
			err := c.Validate()
			if tc.want == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one containing %q", err, tc.want)
			}
		})
	}
	c := s3Config()
	c.GCGrace = -time.Second
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "gcGrace: -1s") {
		t.Fatalf("negative gcGrace: %v", err)
	}
}

func TestStorageCheckFiles(t *testing.T) {
	dir := t.TempDir()
	ca := testcert.NewCA(t)
	good := filepath.Join(dir, "ca.pem")
	testcert.Write(t, good, ca.Issue(t, "rgw.example").CertPEM())
	garbage := filepath.Join(dir, "garbage.pem")
	testcert.Write(t, garbage, []byte("not a certificate\n"))
	c := s3Config()
	c.Storage.CAFile = good
	if err := c.CheckFiles(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ file, want string }{
		{filepath.Join(dir, "missing.pem"), "storage.caFile: tlsconf: read CA: open " + filepath.Join(dir, "missing.pem")},
		{garbage, "storage.caFile: tlsconf: CA PEM holds no certificate: " + garbage},
	} {
		c.Storage.CAFile = tc.file
		if err := c.CheckFiles(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("caFile %s: %v, want %q", tc.file, err, tc.want)
		}
	}
	// A local store never looks at S3 files.
	l, _ := Defaults(ProfileImagestore)
	l.Storage.CAFile = filepath.Join(dir, "missing.pem")
	if err := l.CheckFiles(); err != nil {
		t.Fatalf("local store checked storage.caFile: %v", err)
	}
}

const (
	testAK = "AKIDEXAMPLE0123456789"
	testSK = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
)

func TestResolveStorageCredentials(t *testing.T) {
	credBody := fmt.Sprintf("# rgw user ci\n[default]\naws_access_key_id = %s\naws_secret_access_key=%s\nregion = us-east-1\n\n[other]\naws_access_key_id = OTHERAK\naws_secret_access_key = OTHERSK\n", testAK, testSK)
	file := writeCreds(t, credBody, 0o600)
	groupReadable := writeCreds(t, credBody, 0o640)
	worldReadable := writeCreds(t, credBody, 0o644)
	sessionTok := writeCreds(t, "[default]\naws_access_key_id=a\naws_secret_access_key=b\naws_session_token=c\n", 0o600)
	noSecret := writeCreds(t, "aws_access_key_id = a\n", 0o600)
	s3env := map[string]string{EnvS3AccessKey: "envAK", EnvS3SecretKey: "envSK"}
	awsenv := map[string]string{EnvAWSAccessKey: "awsAK", EnvAWSSecretKey: "awsSK"}
	both := map[string]string{EnvS3AccessKey: "envAK", EnvS3SecretKey: "envSK", EnvAWSAccessKey: "awsAK", EnvAWSSecretKey: "awsSK"}
	for _, tc := range []struct {
		name           string
		file, profile  string
		env            map[string]string
		ak, sk, source string
		errSub         string
		local          bool
	}{
		{name: "file", file: file, ak: testAK, sk: testSK, source: "file " + file},
		{name: "file 0640 (service group)", file: groupReadable, ak: testAK, sk: testSK},
		{name: "file profile", file: file, profile: "other", ak: "OTHERAK", sk: "OTHERSK"},
		{name: "imagestore env", env: s3env, ak: "envAK", sk: "envSK", source: "environment " + EnvS3AccessKey + "/" + EnvS3SecretKey},
		{name: "aws env", env: awsenv, ak: "awsAK", sk: "awsSK", source: "environment " + EnvAWSAccessKey + "/" + EnvAWSSecretKey},
		{name: "imagestore env beats aws env", env: both, ak: "envAK", sk: "envSK"},
		{name: "local reads nothing", local: true, file: filepath.Join(t.TempDir(), "missing"), env: map[string]string{EnvAWSAccessKey: "half"}},
		{name: "both sources", file: file, env: awsenv, errSub: "both storage.credentialsFile (" + file + ") and the environment AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY are set; use one"},
		{name: "neither", errSub: "type s3 needs an access key: set storage.credentialsFile, or IMAGESTORE_S3_ACCESS_KEY and IMAGESTORE_S3_SECRET_KEY"},
		{name: "half env pair", env: map[string]string{EnvAWSAccessKey: "awsAK"}, errSub: "AWS_ACCESS_KEY_ID is set without AWS_SECRET_ACCESS_KEY"},
		{name: "half imagestore pair", env: map[string]string{EnvS3SecretKey: "sk", EnvAWSAccessKey: "a", EnvAWSSecretKey: "b"}, errSub: "IMAGESTORE_S3_SECRET_KEY is set without IMAGESTORE_S3_ACCESS_KEY"},
		{name: "world-readable file", file: worldReadable, errSub: "readable or writable by other users (mode 0644); chmod o-rwx"},
		{name: "missing file", file: filepath.Join(t.TempDir(), "nope"), errSub: "storage.credentialsFile: open "},
		{name: "directory", file: t.TempDir(), errSub: "is not a regular file"},
		{name: "missing profile", file: file, profile: "nope", errSub: "no aws_access_key_id or aws_secret_access_key in section [nope]"},
		{name: "no secret", file: noSecret, errSub: "section [default] has no aws_secret_access_key"},
		{name: "session token", file: sessionTok, errSub: "line 4: aws_session_token: temporary credentials are not supported"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := s3Config()
			if tc.local {
				c = Default()
			}
			c.Storage.CredentialsFile, c.Storage.CredentialsProfile = tc.file, tc.profile
			err := c.ResolveStorageCredentials(envMap(tc.env))
			if tc.errSub != "" {
				if err == nil || !strings.Contains(err.Error(), tc.errSub) {
					t.Fatalf("err = %v, want %q", err, tc.errSub)
				}
				for _, v := range []string{testSK, "awsSK", "envSK", "OTHERSK"} {
					if strings.Contains(err.Error(), v) {
						t.Fatalf("the error shows a secret: %v", err)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if string(c.Storage.AccessKey) != tc.ak || string(c.Storage.SecretKey) != tc.sk {
				t.Fatalf("keys %q/%q, want %q/%q", c.Storage.AccessKey, c.Storage.SecretKey, tc.ak, tc.sk)
			}
			if tc.source != "" && c.Storage.CredentialSource() != tc.source {
				t.Fatalf("source %q, want %q", c.Storage.CredentialSource(), tc.source)
			}
		})
	}
}

// TestParseCredentialsErrorsShowNoValue: a malformed line's text, which may
// be a key, never reaches the error.
func TestParseCredentialsErrorsShowNoValue(t *testing.T) {
	for _, body := range []string{
		"[default]\naws_secret_access_key " + testSK + "\n",
		"[default\naws_secret_access_key = " + testSK + "\n",
		"[" + testSK + "\n",
		testSK + "\n",
	} {
		_, _, err := ParseCredentials([]byte(body), "")
		if err == nil || strings.Contains(err.Error(), testSK) {
			t.Errorf("%q: err = %v (want an error without the value)", body, err)
		}
	}
	ak, sk, err := ParseCredentials([]byte("aws_access_key_id=a\r\naws_secret_access_key = b = c\r\n"), "")
	if err != nil || ak != "a" || sk != "b = c" {
		t.Fatalf("keys before any section, CRLF, '=' in a value: %q %q %v", ak, sk, err)
	}
	ak, _, err = ParseCredentials([]byte("[profile store]\naws_access_key_id=x\naws_secret_access_key=y\n"), "store")
	if err != nil || ak != "x" {
		t.Fatalf("[profile NAME] (the AWS config-file spelling): %q %v", ak, err)
	}
}

// TestStorageSecretsNeverPrinted: resolved S3 keys appear in no rendering
// of the configuration: the YAML dump (-print-config), fmt verbs, JSON, and
// structured logs of the whole config or of its storage section.
func TestStorageSecretsNeverPrinted(t *testing.T) {
	c := s3Config()
	c.Storage.CredentialsFile = writeCreds(t, "[default]\naws_access_key_id="+testAK+"\naws_secret_access_key="+testSK+"\n", 0o600)
	if err := c.ResolveStorageCredentials(envMap(nil)); err != nil {
		t.Fatal(err)
	}
	if string(c.Storage.SecretKey) != testSK {
		t.Fatal("keys not resolved")
	}
	j, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	for _, h := range []slog.Handler{slog.NewTextHandler(&logs, nil), slog.NewJSONHandler(&logs, nil)} {
		l := slog.New(h)
		l.Info("config", "cfg", c)
		l.Info("storage", "storage", c.Storage)
		l.Info("keys", "ak", c.Storage.AccessKey, "sk", c.Storage.SecretKey)
	}
	for _, tc := range []struct{ name, out string }{
		{"String", c.String()},
		{"%v", fmt.Sprintf("%v", c)},
		{"%+v", fmt.Sprintf("%+v", c)},
		{"%#v", fmt.Sprintf("%#v", c)},
		{"storage %+v", fmt.Sprintf("%+v", c.Storage)},
		{"storage %#v", fmt.Sprintf("%#v", c.Storage)},
		{"json", string(j)},
		{"slog", logs.String()},
	} {
		for _, v := range []string{testAK, testSK} {
			if strings.Contains(tc.out, v) {
				t.Errorf("%s shows a key:\n%s", tc.name, tc.out)
			}
		}
	}
	if s := c.String(); !strings.Contains(s, "type: s3") || !strings.Contains(s, "bucket: backups") || !strings.Contains(s, "credentialsFile: "+c.Storage.CredentialsFile) {
		t.Errorf("the dump lacks the storage settings:\n%s", s)
	}
}

// FuzzParseCredentials: any bytes parse or fail without panicking; a pair
// it returns is two non-empty single-line values taken from the input.
func FuzzParseCredentials(f *testing.F) {
	f.Add([]byte("[default]\naws_access_key_id = a\naws_secret_access_key = b\n"), "")
	f.Add([]byte("aws_access_key_id=a\naws_secret_access_key=b\n[x]\naws_access_key_id=c\n"), "x")
	f.Add([]byte("[profile p]\r\n; c\n# c\naws_session_token=t\n"), "p")
	f.Add([]byte("[\n=\n[]\n"), "")
	f.Fuzz(func(t *testing.T, b []byte, profile string) {
		ak, sk, err := ParseCredentials(b, profile)
		if err != nil {
			if ak != "" || sk != "" {
				t.Fatalf("keys with an error: %q %q %v", ak, sk, err)
			}
			return
		}
		for _, v := range []string{ak, sk} {
			if v == "" || strings.ContainsAny(v, "\r\n") || !bytes.Contains(b, []byte(v)) {
				t.Fatalf("key %q not a non-empty single-line value of the input %q", v, b)
			}
		}
	})
}
