package config

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestDefaultConfigIsValid(t *testing.T) {
	cfg := Default()
	if err := cfg.Validate(); err != nil {
		t.Fatalf("defaults do not validate: %v", err)
	}
	for _, tc := range []struct {
		name      string
		got, want any
	}{
		{"listen", cfg.Listen, ":8001"},
		{"registryListen", cfg.RegistryListen, ":8000"},
		{"maxConnections", cfg.MaxConnections, 1024},
		{"registryMaxConnections", cfg.RegistryMaxConnections, 1024},
		{"parallelismDegree", cfg.ParallelismDegree, 10},
		{"logLevel", cfg.LogLevel, "info"},
		{"logFormat", cfg.LogFormat, "text"},
		{"token", cfg.Token, Secret("")},
		{"quota", cfg.Quota, ByteSize(0)},
		{"uploadDirExpiry", cfg.UploadDirExpiry, 24 * time.Hour},
		{"jobRetention", cfg.JobRetention, 24 * time.Hour},
		{"maxBodyBytes", cfg.MaxBodyBytes, int64(1 << 20)},
		{"nbd.portRange", cfg.NBD.PortRange, "10800-10899"},
	} {
		if !reflect.DeepEqual(tc.got, tc.want) {
			t.Errorf("default %s = %v, want %v", tc.name, tc.got, tc.want)
		}
	}
}

// clearEnv unsets every variable LoadConfig reads, so the test machine's
// environment cannot leak in.
func clearEnv(t *testing.T) {
	t.Helper()
	c := Default()
	for _, n := range c.EnvNames() {
		if _, ok := os.LookupEnv(n); ok {
			t.Setenv(n, "")
			os.Unsetenv(n)
		}
	}
}

func writeConfigFile(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadConfigPrecedence(t *testing.T) {
	clearEnv(t)
	path := writeConfigFile(t, `
root: /from/file
listen: 127.0.0.1:9001
maxConnections: 64
registryMaxConnections: 32
parallelismDegree: 3
quota: 10GiB
logLevel: warn
uploadDirExpiry: 2h
token: file-token
nbd:
  portRange: "20000-20010"
`)
	// File only: file values over defaults, defaults elsewhere.
	cfg, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Root != "/from/file" || cfg.Listen != "127.0.0.1:9001" || cfg.ParallelismDegree != 3 ||
		cfg.Quota != 10<<30 || cfg.LogLevel != "warn" || cfg.UploadDirExpiry != 2*time.Hour ||
		cfg.Token != "file-token" || cfg.NBD.PortRange != "20000-20010" ||
		cfg.MaxConnections != 64 || cfg.RegistryMaxConnections != 32 {
		t.Fatalf("file values not applied: %+v", cfg)
	}
	if cfg.RegistryListen != ":8000" || cfg.JobRetention != 24*time.Hour || cfg.NBD.Bind != "0.0.0.0" {
		t.Fatalf("defaults lost for keys the file does not set: %+v", cfg)
	}

	// The environment overrides the file.
	t.Setenv("IMAGESTORE_ROOT", "/from/env")
	t.Setenv("IMAGESTORE_PARALLELISM_DEGREE", "7")
	t.Setenv("IMAGESTORE_QUOTA", "512MB")
	t.Setenv("IMAGESTORE_TOKEN", "env-token")
	t.Setenv("IMAGESTORE_UPLOAD_DIR_EXPIRY", "90m")
	t.Setenv("IMAGESTORE_MAX_CONNECTIONS", "100")
	t.Setenv("IMAGESTORE_ALLOWED_IMPORT_ROOTS", "/a"+string(os.PathListSeparator)+"/b")
	cfg, err = Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Root != "/from/env" || cfg.ParallelismDegree != 7 || cfg.Quota != 512e6 ||
		cfg.Token != "env-token" || cfg.UploadDirExpiry != 90*time.Minute || cfg.MaxConnections != 100 ||
		!reflect.DeepEqual(cfg.AllowedImportRoots, []string{"/a", "/b"}) {
		t.Fatalf("environment not applied over the file: %+v", cfg)
	}
	if cfg.Listen != "127.0.0.1:9001" || cfg.LogLevel != "warn" || cfg.RegistryMaxConnections != 32 {
		t.Fatalf("file values the environment does not set were lost: %+v", cfg)
	}
}

func TestLoadConfigErrors(t *testing.T) {
	clearEnv(t)
	for _, tc := range []struct {
		name, file string
		env        map[string]string
		want       string
	}{
		{"unknown key", "root: /x\nparalellismDegree: 3\n", nil, "paralellismDegree"},
		{"bad byte size", "quota: 10 furlongs\n", nil, `unknown unit "furlongs"`},
		{"bad duration", "uploadDirExpiry: soon\n", nil, "line 1: cannot unmarshal !!str `soon` into time.Duration"},
		{"env bad int", "", map[string]string{"IMAGESTORE_PARALLELISM_DEGREE": "many"}, "IMAGESTORE_PARALLELISM_DEGREE"},
		{"env bad connection cap", "", map[string]string{"IMAGESTORE_REGISTRY_MAX_CONNECTIONS": "1k"}, "IMAGESTORE_REGISTRY_MAX_CONNECTIONS"},
		{"env bad duration", "", map[string]string{"IMAGESTORE_JOB_RETENTION": "1 day"}, "IMAGESTORE_JOB_RETENTION"},
		{"env bad size", "", map[string]string{"IMAGESTORE_QUOTA": "-1G"}, "IMAGESTORE_QUOTA"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			_, err := Load(writeConfigFile(t, tc.file))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one mentioning %q", err, tc.want)
			}
		})
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.yaml")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing file: err = %v, want ErrNotExist", err)
	}
	cfg, err := Load(writeConfigFile(t, ""))
	if err != nil || !reflect.DeepEqual(cfg, Default()) {
		t.Fatalf("empty file: %v, %+v", err, cfg)
	}
}

func TestApplyEnvLookup(t *testing.T) {
	env := map[string]string{
		"IMAGESTORE_LISTEN":                   "127.0.0.1:1",
		"IMAGESTORE_LOG_FORMAT":               "json",
		"IMAGESTORE_NBD_PORT_RANGE":           "1-2",
		"IMAGESTORE_CALLBACK_RETRIES":         "0",
		"IMAGESTORE_REGISTRY_MAX_CONNECTIONS": "2",
		"UNRELATED":                           "x",
	}
	cfg := Default()
	if err := cfg.ApplyEnv(func(k string) (string, bool) { v, ok := env[k]; return v, ok }); err != nil {
		t.Fatal(err)
	}
	if cfg.Listen != "127.0.0.1:1" || cfg.LogFormat != "json" || cfg.NBD.PortRange != "1-2" || cfg.CallbackRetries != 0 ||
		cfg.RegistryMaxConnections != 2 || cfg.MaxConnections != DefaultMaxConnections {
		t.Fatalf("env not applied: %+v", cfg)
	}
	for _, n := range cfg.EnvNames() {
		if !strings.HasPrefix(n, "IMAGESTORE_") {
			t.Errorf("env name %s lacks the IMAGESTORE_ prefix", n)
		}
	}
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		mod  func(*Config)
		want string // "" = valid
	}{
		{"defaults", func(*Config) {}, ""},
		{"json logs", func(c *Config) { c.LogFormat = "json"; c.LogLevel = "DEBUG" }, ""},
		{"tls pair", func(c *Config) { c.TLS = TLS{Cert: "c.pem", Key: "k.pem"} }, ""},
		{"single nbd port", func(c *Config) { c.NBD.PortRange = "10809" }, ""},
		{"nbd disabled", func(c *Config) { c.NBD.PortRange = "" }, ""},
		{"empty root", func(c *Config) { c.Root = "" }, "root: empty"},
		{"zero maxConnections", func(c *Config) { c.MaxConnections = 0 }, "maxConnections: 0, must be positive"},
		{"negative registryMaxConnections", func(c *Config) { c.RegistryMaxConnections = -1 }, "registryMaxConnections: -1, must be positive"},
		{"one connection each", func(c *Config) { c.MaxConnections, c.RegistryMaxConnections = 1, 1 }, ""},
		{"zero parallelism", func(c *Config) { c.ParallelismDegree = 0 }, "parallelismDegree: 0, must be at least 1"},
		{"negative parallelism", func(c *Config) { c.ParallelismDegree = -2 }, "parallelismDegree: -2, must be at least 1"},
		{"tls cert without key", func(c *Config) { c.TLS.Cert = "c.pem" }, "tls: cert and key must be set together"},
		{"tls key without cert", func(c *Config) { c.TLS.Key = "k.pem" }, "tls: cert and key must be set together"},
		{"unknown log level", func(c *Config) { c.LogLevel = "verbose" }, `logLevel: "verbose", want debug, info, warn or error`},
		{"unknown log format", func(c *Config) { c.LogFormat = "xml" }, `logFormat: "xml", want text or json`},
		{"negative callback retries", func(c *Config) { c.CallbackRetries = -1 }, "callbackRetries: -1 is negative"},
		{"zero body limit", func(c *Config) { c.MaxBodyBytes = 0 }, "maxBodyBytes: 0, must be positive"},
		{"zero upload expiry", func(c *Config) { c.UploadDirExpiry = 0 }, "uploadDirExpiry: 0s, must be positive"},
		{"verify sample above 1", func(c *Config) { c.VerifySample = 1.5 }, "verifySample: 1.5, want 0..1"},
		{"port range reversed", func(c *Config) { c.NBD.PortRange = "10900-10800" }, `nbd.portRange "10900-10800"`},
		{"port range too high", func(c *Config) { c.NBD.PortRange = "65000-70000" }, `nbd.portRange "65000-70000"`},
		{"port range garbage", func(c *Config) { c.NBD.PortRange = "lots" }, `nbd.portRange "lots"`},
		{"port zero", func(c *Config) { c.NBD.PortRange = "0-10" }, `nbd.portRange "0-10"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Default()
			tc.mod(&cfg)
			err := cfg.Validate()
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
	// Every problem is reported at once, not just the first.
	cfg := Default()
	cfg.ParallelismDegree = -1
	cfg.LogLevel = "loud"
	cfg.TLS.Key = "k.pem"
	err := cfg.Validate()
	for _, w := range []string{"parallelismDegree", "logLevel", "tls"} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("combined error %v lacks %s", err, w)
		}
	}
}

func TestConfigStringRedactsSecrets(t *testing.T) {
	const tok = "very-secret-token-1234"
	cfg := Default()
	cfg.Token = tok
	cfg.Quota = 5 << 30
	for _, tc := range []struct {
		name string
		out  string
	}{
		{"String", cfg.String()},
		{"%v", fmt.Sprintf("%v", cfg)},
		{"%+v", fmt.Sprintf("%+v", cfg)},
		{"String token", cfg.Token.String()},
		{"%v token", fmt.Sprintf("%v", cfg.Token)},
		{"%#v token", fmt.Sprintf("%#v", cfg.Token)},
	} {
		if strings.Contains(tc.out, tok) {
			t.Errorf("%s leaks the token: %s", tc.name, tc.out)
		}
	}
	s := cfg.String()
	if !strings.Contains(s, "token: <redacted>") {
		t.Errorf("String() does not show the token as redacted:\n%s", s)
	}
	if !strings.Contains(s, "parallelismDegree: 10") || !strings.Contains(s, "listen: :8001") {
		t.Errorf("String() lacks ordinary settings:\n%s", s)
	}
	b, err := Secret(tok).MarshalJSON()
	if err != nil || strings.Contains(string(b), tok) {
		t.Errorf("MarshalJSON leaks: %s %v", b, err)
	}
	// No token: nothing claims one is set.
	if strings.Contains(Default().String(), "redacted") {
		t.Errorf("empty token rendered as redacted")
	}
}

func TestResolveToken(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "tok")
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(good, []byte("  file-secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(empty, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name         string
		token, file  string
		want, errSub string
	}{
		{"from file, trimmed", "", good, "file-secret", ""},
		{"explicit token wins", "direct", good, "direct", ""},
		{"neither", "", "", "", ""},
		{"empty file", "", empty, "", "is empty"},
		{"missing file", "", filepath.Join(dir, "nope"), "", "token file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Default()
			cfg.Token, cfg.TokenFile = Secret(tc.token), tc.file
			err := cfg.ResolveToken()
			if tc.errSub != "" {
				if err == nil || !strings.Contains(err.Error(), tc.errSub) {
					t.Fatalf("err = %v, want %q", err, tc.errSub)
				}
				return
			}
			if err != nil || string(cfg.Token) != tc.want {
				t.Fatalf("token %q err %v, want %q", string(cfg.Token), err, tc.want)
			}
		})
	}
}

func TestParseByteSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want ByteSize
		err  string
	}{
		{"", 0, ""},
		{"0", 0, ""},
		{"1048576", 1 << 20, ""},
		{"  42  ", 42, ""},
		{"10B", 10, ""},
		{"512k", 512 << 10, ""},
		{"512K", 512 << 10, ""},
		{"2KB", 2000, ""},
		{"2KiB", 2048, ""},
		{"3M", 3 << 20, ""},
		{"3MB", 3e6, ""},
		{"3MiB", 3 << 20, ""},
		{"10GiB", 10 << 30, ""},
		{"10gib", 10 << 30, ""},
		{"1.5 GB", 1.5e9, ""},
		{"1.5GiB", 3 << 29, ""},
		{"2T", 2 << 40, ""},
		{"2TB", 2e12, ""},
		{"1TiB", 1 << 40, ""},
		{".5k", 512, ""},
		{"10 furlongs", 0, `unknown unit "furlongs"`},
		{"10PB", 0, `unknown unit "pb"`},
		{"GiB", 0, "not a non-negative number"},
		{"-1", 0, "not a non-negative number"},
		{"-1GiB", 0, "not a non-negative number"},
		{"1.2.3M", 0, "not a non-negative number"},
		{"1k2", 0, "not a non-negative number"},
		{"99999999TiB", 0, "too large"},
		{"1e30", 0, "too large"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseByteSize(tc.in)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("ParseByteSize(%q) = %d, %v; want error %q", tc.in, got, err, tc.err)
				}
				if !strings.Contains(err.Error(), fmt.Sprintf("%q", tc.in)) {
					t.Fatalf("error %v does not quote the input", err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("ParseByteSize(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
			}
		})
	}
}

func TestByteSizeYAMLLine(t *testing.T) {
	clearEnv(t)
	_, err := Load(writeConfigFile(t, "root: /x\n\nquota: lots\n"))
	if err == nil || !strings.Contains(err.Error(), "line 3") {
		t.Fatalf("err = %v, want it to name line 3", err)
	}
}

func TestParseLogLevelAndNewLogger(t *testing.T) {
	for _, tc := range []struct {
		level, format string
		ok            bool
	}{
		{"debug", "text", true},
		{"INFO", "json", true},
		{"warning", "", true},
		{"error", "json", true},
		{"trace", "text", false},
		{"info", "logfmt", false},
	} {
		cfg := Default()
		cfg.LogLevel, cfg.LogFormat = tc.level, tc.format
		var sb strings.Builder
		l, err := NewLogger(&sb, cfg)
		if (err == nil) != tc.ok {
			t.Errorf("NewLogger(%s,%s) err = %v, want ok=%v", tc.level, tc.format, err, tc.ok)
			continue
		}
		if tc.ok {
			l.Error("hello", "k", "v")
			if !strings.Contains(sb.String(), "hello") {
				t.Errorf("logger %s/%s wrote %q", tc.level, tc.format, sb.String())
			}
		}
	}
}

func TestNBDClientAuthConfig(t *testing.T) {
	for _, tc := range []struct {
		auth  string
		token bool
		psk   bool
	}{
		{"", false, false}, {"", true, true}, {"auto", false, false}, {"auto", true, true},
		{"psk", false, true}, {"psk", true, true}, {"none", true, false}, {"none", false, false},
	} {
		if got := (NBD{ClientAuth: tc.auth}).PSK(tc.token); got != tc.psk {
			t.Errorf("clientAuth %q, token %v: psk %v, want %v", tc.auth, tc.token, got, tc.psk)
		}
	}
	c := Default()
	c.NBD.ClientAuth = "x509"
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "nbd.clientAuth") {
		t.Fatalf("Validate of clientAuth x509 = %v, want an nbd.clientAuth error", err)
	}
}

func FuzzParseByteSize(f *testing.F) {
	for _, s := range []string{"", "0", "1048576", "10GiB", "1.5 GB", "512k", ".5k", "-1", "1e30",
		"99999999TiB", "GiB", "1k2", "1.2.3M", " 7 mb ", "NaN", "Inf", "0x10", "1_000"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, err := ParseByteSize(s)
		if err != nil {
			if v != 0 {
				t.Fatalf("%q: error %v with value %d", s, err, v)
			}
			if !strings.Contains(err.Error(), "byte size") {
				t.Fatalf("%q: unclear error %v", s, err)
			}
			return
		}
		if v < 0 || v > 1<<62 {
			t.Fatalf("%q: out of range %d", s, v)
		}
		// Plain decimal integers parse exactly (up to float precision).
		if n, perr := strconv.ParseInt(strings.TrimSpace(s), 10, 64); perr == nil && n >= 0 && n < 1<<53 && int64(v) != n {
			t.Fatalf("%q = %d, want %d", s, v, n)
		}
	})
}

func TestProfiles(t *testing.T) {
	clearEnv(t)
	zs, err := Defaults(ProfileZStack)
	if err != nil {
		t.Fatal(err)
	}
	if Default().Profile != ProfileZStack || !reflect.DeepEqual(Default(), zs) {
		t.Fatalf("the shipped default is not the zstack profile: %+v", Default())
	}
	if zs.AgentListenerTLS().Enabled() || zs.RegistryListenerTLS() != (TLS{Cert: ZStackCertFile, Key: ZStackKeyFile}) ||
		zs.ServerName != "store.zstack.org" || zs.NBD.PSK(true) || zs.Token != "" || zs.Listen != ":8001" || zs.RegistryListen != ":8000" {
		t.Fatalf("zstack profile: %+v", zs)
	}
	ours, err := Defaults(ProfileImagestore)
	if err != nil {
		t.Fatal(err)
	}
	if ours.AgentListenerTLS().Enabled() || ours.RegistryListenerTLS().Enabled() || ours.ServerName != "" || !ours.NBD.PSK(true) {
		t.Fatalf("imagestore profile: %+v", ours)
	}
	ours.TLS = TLS{Cert: "c", Key: "k"}
	if ours.AgentListenerTLS() != ours.TLS || ours.RegistryListenerTLS() != ours.TLS {
		t.Fatal("tls does not cover both ports")
	}
	ours.AgentTLS.Plain = true
	ours.RegistryTLS = ListenerTLS{Cert: "rc", Key: "rk"}
	if ours.AgentListenerTLS().Enabled() || ours.RegistryListenerTLS() != (TLS{Cert: "rc", Key: "rk"}) {
		t.Fatal("a port's own block does not win over tls")
	}
	if _, err := Defaults("zstore"); err == nil {
		t.Fatal("unknown profile accepted")
	}

	// Which profile: flag > IMAGESTORE_PROFILE > the file's key > default;
	// the file's other keys apply over the chosen profile's defaults.
	path := writeConfigFile(t, "profile: imagestore\nserverName: peer.example\n")
	for _, tc := range []struct {
		name, flag, env, want string
		psk                   bool
	}{
		{"file", "", "", ProfileImagestore, true},
		{"env beats file", "", ProfileZStack, ProfileZStack, false},
		{"flag beats env", ProfileImagestore, ProfileZStack, ProfileImagestore, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.env != "" {
				t.Setenv("IMAGESTORE_PROFILE", tc.env)
			}
			c, err := LoadProfile(path, tc.flag)
			if err != nil {
				t.Fatal(err)
			}
			if c.Profile != tc.want || c.NBD.PSK(true) != tc.psk || c.ServerName != "peer.example" {
				t.Fatalf("%+v", c)
			}
		})
	}
	if c, err := Load(""); err != nil || c.Profile != ProfileZStack {
		t.Fatalf("no file: %v %+v", err, c)
	}
	t.Setenv("IMAGESTORE_REGISTRY_TLS_PLAIN", "true")
	t.Setenv("IMAGESTORE_REGISTRY_TLS_CERT", "")
	t.Setenv("IMAGESTORE_REGISTRY_TLS_KEY", "")
	if c, err := Load(""); err != nil || c.RegistryListenerTLS().Enabled() {
		t.Fatalf("IMAGESTORE_REGISTRY_TLS_PLAIN: %v %+v", err, c)
	}
}

func TestCheckFiles(t *testing.T) {
	dir := t.TempDir()
	cert, key := filepath.Join(dir, "c.pem"), filepath.Join(dir, "k.pem")
	for _, p := range []string{cert, key} {
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	c, _ := Defaults(ProfileImagestore)
	c.RegistryTLS = ListenerTLS{Cert: cert, Key: key}
	if err := c.CheckFiles(); err != nil {
		t.Fatal(err)
	}
	c.TLS = TLS{Cert: filepath.Join(dir, "nope.pem"), Key: key}
	if err := c.CheckFiles(); err == nil || !strings.Contains(err.Error(), "tls.cert: open "+filepath.Join(dir, "nope.pem")) {
		t.Fatalf("missing tls.cert: %v", err)
	}
	zs, _ := Defaults(ProfileZStack)
	err := zs.CheckFiles()
	if _, statErr := os.Stat(ZStackCertFile); statErr == nil {
		if err != nil && strings.Contains(err.Error(), "registryTLS.cert") {
			t.Fatalf("certificate present but reported: %v", err)
		}
	} else if err == nil || !strings.Contains(err.Error(), "registryTLS.cert: open "+ZStackCertFile) ||
		!strings.Contains(err.Error(), "-profile imagestore") {
		t.Fatalf("zstack defaults without ZStack's certificate: %v", err)
	}
}

// TestSampleConfigLoads: the annotated sample the package ships loads, and
// its listener blocks are the zstack profile's defaults.
func TestSampleConfigLoads(t *testing.T) {
	clearEnv(t)
	c, err := Load("../../systemd/imagestore-agent.yaml")
	if err != nil {
		t.Fatal(err)
	}
	zs := Default()
	if err := c.Validate(); err != nil || c.Profile != ProfileZStack || c.AgentTLS != zs.AgentTLS ||
		c.RegistryTLS != zs.RegistryTLS || c.ServerName != zs.ServerName || c.NBD != zs.NBD {
		t.Fatalf("sample: %v %+v", err, c)
	}
}
