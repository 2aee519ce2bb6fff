// Package config is the daemon's configuration: its fields and defaults,
// loading from a YAML file and IMAGESTORE_* variables, and validation.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"imagestore/internal/redact"
)

// Config is the daemon configuration. Precedence: defaults, then the YAML
// file, then IMAGESTORE_* environment variables, then command-line flags
// (applied by the binary). Every key is documented in docs/agent-protocol.md
// and systemd/imagestore-agent.yaml.
type Config struct {
	// Profile picks the defaults every other key starts from: ProfileZStack
	// (the shipped default: what a ZStack management node needs) or
	// ProfileImagestore (our own: one TLS block for both ports, token and
	// NBD PSK protections). It is read before the rest of the file.
	Profile        string `yaml:"profile"`
	Root           string `yaml:"root"`
	Listen         string `yaml:"listen"`
	RegistryListen string `yaml:"registryListen"`
	// MaxConnections and RegistryMaxConnections cap the connections open
	// at once on the agent port (listen) and the registry port: beyond
	// them, new clients wait in the kernel's accept backlog until one
	// closes. Each connection costs a goroutine, buffers and a file
	// descriptor, which the blobs need too.
	MaxConnections         int `yaml:"maxConnections"`
	RegistryMaxConnections int `yaml:"registryMaxConnections"`
	// TLS is the certificate of both ports, unless a port's own block
	// (AgentTLS, RegistryTLS) says otherwise.
	TLS         TLS         `yaml:"tls"`
	AgentTLS    ListenerTLS `yaml:"agentTLS"`
	RegistryTLS ListenerTLS `yaml:"registryTLS"`
	// ServerName is the name our clients verify in a peer store's
	// certificate (the /v1 ca field, zstore:// imports), whatever address
	// they dial; "" verifies the dialled host.
	ServerName string `yaml:"serverName"`
	// Token is the bearer token every endpoint but /health requires; empty = no auth.
	Token     Secret `yaml:"token"`
	TokenFile string `yaml:"tokenFile"`
	// Quota caps the store's used bytes; 0 = none. setquota overrides it (persisted).
	Quota             ByteSize      `yaml:"quota"`
	ParallelismDegree int           `yaml:"parallelismDegree"`
	UploadDirExpiry   time.Duration `yaml:"uploadDirExpiry"`
	LogLevel          string        `yaml:"logLevel"`
	LogFormat         string        `yaml:"logFormat"`
	JobRetention      time.Duration `yaml:"jobRetention"`
	CallbackRetries   int           `yaml:"callbackRetries"`
	CallbackMaxDelay  time.Duration `yaml:"callbackMaxDelay"`
	// CallbackTimeout bounds one callback POST.
	CallbackTimeout time.Duration `yaml:"callbackTimeout"`
	VerifyInterval  time.Duration `yaml:"verifyInterval"`
	// VerifySample is the fraction of blobs each periodic scrub reads (0 or 1 = all).
	VerifySample float64 `yaml:"verifySample"`
	// GCGrace: GC never frees a blob committed less than this ago (the
	// commit grace); 0 = the storage type's default (DefaultGCGrace).
	GCGrace time.Duration `yaml:"gcGrace"`
	// Storage is where blobs and image records live (storage.go).
	Storage Storage `yaml:"storage"`
	// AllowedImportRoots lists directories besides <root>/uploads that
	// import-backup may read file:// URLs from.
	AllowedImportRoots []string `yaml:"allowedImportRoots"`
	KnownHostsFile     string   `yaml:"knownHostsFile"`
	// SSHKeyFile is the private key (PEM) sftp:// imports log in with.
	SSHKeyFile string `yaml:"sshKeyFile"`
	// MaxImportSize caps one URL import's download; 0 = no cap (the quota applies).
	MaxImportSize ByteSize    `yaml:"maxImportSize"`
	NBD           NBD         `yaml:"nbd"`
	Replication   Replication `yaml:"replication"`
	// MaxBodyBytes limits a request body.
	MaxBodyBytes int64 `yaml:"maxBodyBytes"`
	// ShutdownTimeout bounds how long SIGTERM waits for in-flight requests.
	ShutdownTimeout time.Duration `yaml:"shutdownTimeout"`
	// PIDFile, when set, receives the daemon's pid once both ports listen,
	// and is removed at exit (if it still holds that pid). Init scripts
	// find the daemon by it, even after an install replaced its executable.
	PIDFile string `yaml:"pidFile"`
	// ExportExpiry, when positive, removes an export (and so revokes its
	// URL) this long after it was made; 0 keeps exports until delexp.
	ExportExpiry time.Duration `yaml:"exportExpiry"`
	// Debug enables diagnostic commands (/imagestore/debug/*).
	Debug bool `yaml:"debug"`
	// Connect is what connect reports (connect.go).
	Connect Connect `yaml:"connect"`
	// MaxLargeBodyBytes limits the bodies of gc (the keep list) and
	// dumpimagemetadatatofile (every image's inventory), which name every
	// image the management node knows (tens of MB); every other path keeps
	// MaxBodyBytes (and these never take less than that).
	MaxLargeBodyBytes int64 `yaml:"maxLargeBodyBytes"`
}

// TLS enables HTTPS when both files are set.
type TLS struct {
	Cert string `yaml:"cert"`
	Key  string `yaml:"key"`
}

// Enabled reports whether the files are set.
func (t TLS) Enabled() bool { return t.Cert != "" }

// ListenerTLS is one port's own TLS: its certificate, or Plain to serve
// plain HTTP whatever tls says. Neither set: the port uses tls.
type ListenerTLS struct {
	Cert  string `yaml:"cert"`
	Key   string `yaml:"key"`
	Plain bool   `yaml:"plain"`
}

// DefaultMaxConnections is each port's default cap on open connections.
const DefaultMaxConnections = 1024

// Profiles.
const (
	ProfileZStack     = "zstack"
	ProfileImagestore = "imagestore"
	// DefaultProfile is the profile used when none is configured.
	DefaultProfile = ProfileZStack
)

// ZStack's deployment puts its store certificate and key here on every
// backup storage host (PROTOCOL: deployment contract).
const (
	ZStackCertFile = "/var/lib/zstack/imagestorebackupstorage/package/certs/ca.pem"
	ZStackKeyFile  = "/var/lib/zstack/imagestorebackupstorage/package/certs/privkey.pem"
	// ZStackServerName is the only name in ZStack's store certificate.
	ZStackServerName = "store.zstack.org"
)

// AgentListenerTLS is the certificate the agent port (listen) serves; zero = plain.
func (c Config) AgentListenerTLS() TLS { return c.AgentTLS.effective(c.TLS) }

// RegistryListenerTLS is the certificate the registry port serves; zero = plain.
func (c Config) RegistryListenerTLS() TLS { return c.RegistryTLS.effective(c.TLS) }

func (l ListenerTLS) effective(shared TLS) TLS {
	switch {
	case l.Plain:
		return TLS{}
	case l.Cert != "" || l.Key != "":
		return TLS{Cert: l.Cert, Key: l.Key}
	}
	return shared
}

// NBD configures the qemu-nbd servers (exportnbdimage, export/remotetarget).
type NBD struct {
	PortRange string `yaml:"portRange"`
	Bind      string `yaml:"bind"`
	// ClientAuth is how NBD clients prove they may use a served disk:
	// "psk" (TLS with a random pre-shared key per export, returned in the
	// reply), "none" (whoever reaches the port), or "auto" (the default):
	// psk when the agent has a token, none otherwise.
	ClientAuth string `yaml:"clientAuth"`
}

// PSK reports whether NBD servers take a pre-shared key.
func (n NBD) PSK(hasToken bool) bool {
	return n.ClientAuth == "psk" || (n.ClientAuth == "auto" || n.ClientAuth == "") && hasToken
}

// Ports parses PortRange, "10800-10899" (or a single port).
func (n NBD) Ports() (lo, hi int, err error) {
	a, b, ok := strings.Cut(strings.TrimSpace(n.PortRange), "-")
	if !ok {
		b = a
	}
	lo, err1 := strconv.Atoi(strings.TrimSpace(a))
	hi, err2 := strconv.Atoi(strings.TrimSpace(b))
	if err1 != nil || err2 != nil || lo <= 0 || hi > 65535 || hi < lo {
		return 0, 0, fmt.Errorf("nbd.portRange %q: want MIN-MAX within 1-65535", n.PortRange)
	}
	return lo, hi, nil
}

// Replication configures the :8000 push/pull engine.
type Replication struct {
	MaxTasks              int      `yaml:"maxTasks"`
	Parallelism           int      `yaml:"parallelism"`
	NetworkReadBandwidth  ByteSize `yaml:"networkReadBandwidth"`
	NetworkWriteBandwidth ByteSize `yaml:"networkWriteBandwidth"`
	Retries               int      `yaml:"retries"`
}

// Secret is a string that never prints (redact.Secret: fmt, %#v, JSON,
// YAML and slog all show "<redacted>").
type Secret = redact.Secret

// ByteSize is a byte count accepting suffixes: 10GiB, 512MB, 1048576.
type ByteSize int64

// UnmarshalYAML accepts an integer or a string with a unit.
func (b *ByteSize) UnmarshalYAML(n *yaml.Node) error {
	v, err := ParseByteSize(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %w", n.Line, err)
	}
	*b = v
	return nil
}

// ParseByteSize parses "1048576", "10GiB", "1.5 GB", "512k".
func ParseByteSize(s string) (ByteSize, error) {
	t := strings.TrimSpace(s)
	if t == "" {
		return 0, nil
	}
	i := len(t)
	for i > 0 && (t[i-1] < '0' || t[i-1] > '9') && t[i-1] != '.' {
		i--
	}
	num, unit := strings.TrimSpace(t[:i]), strings.ToLower(strings.TrimSpace(t[i:]))
	mult := map[string]float64{
		"": 1, "b": 1,
		"k": 1 << 10, "kb": 1e3, "kib": 1 << 10,
		"m": 1 << 20, "mb": 1e6, "mib": 1 << 20,
		"g": 1 << 30, "gb": 1e9, "gib": 1 << 30,
		"t": 1 << 40, "tb": 1e12, "tib": 1 << 40,
	}[unit]
	if mult == 0 {
		return 0, fmt.Errorf("byte size %q: unknown unit %q", s, unit)
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f < 0 {
		return 0, fmt.Errorf("byte size %q: not a non-negative number", s)
	}
	v := f * mult
	if v > 1<<62 {
		return 0, fmt.Errorf("byte size %q: too large", s)
	}
	return ByteSize(v), nil
}

// Default returns the configuration used when nothing is set: the
// DefaultProfile's.
func Default() Config {
	c, _ := Defaults(DefaultProfile)
	return c
}

// Defaults returns the defaults of profile ("" = DefaultProfile).
//
// zstack: the agent port plain, the registry port HTTPS with ZStack's
// certificate (ZStackCertFile, ZStackKeyFile), peers verified as
// store.zstack.org, NBD without client credentials (KVM hosts send none).
// imagestore: both ports plain unless tls is set, peers verified by the
// dialled host name, NBD PSK when a token is set.
func Defaults(profile string) (Config, error) {
	if profile == "" {
		profile = DefaultProfile
	}
	c := Config{
		Profile:           profile,
		Root:              "./data",
		Listen:            ":8001",
		RegistryListen:    ":8000",
		ParallelismDegree: 10,
		UploadDirExpiry:   24 * time.Hour,
		LogLevel:          "info",
		LogFormat:         "text",
		JobRetention:      24 * time.Hour,
		CallbackRetries:   6,
		CallbackMaxDelay:  30 * time.Second,
		CallbackTimeout:   30 * time.Second,
		VerifyInterval:    24 * time.Hour,
		VerifySample:      1,
		GCGrace:           DefaultLocalGCGrace,
		NBD:               NBD{PortRange: "10800-10899", Bind: "0.0.0.0", ClientAuth: "auto"},
		Replication:       Replication{MaxTasks: 4, Parallelism: 4, Retries: 1},
		MaxBodyBytes:      1 << 20,
		ShutdownTimeout:   30 * time.Second,
		Connect:           Connect{StorageInfo: "sshfs"},
		MaxLargeBodyBytes: 64 << 20,

		// A cloud's hosts, its management node and peer stores, with room;
		// two ports' worth stays far below LimitNOFILE (65536).
		MaxConnections:         DefaultMaxConnections,
		RegistryMaxConnections: DefaultMaxConnections,
	}
	switch profile {
	case ProfileZStack:
		c.AgentTLS = ListenerTLS{Plain: true}
		c.RegistryTLS = ListenerTLS{Cert: ZStackCertFile, Key: ZStackKeyFile}
		c.ServerName = ZStackServerName
		c.NBD.ClientAuth = "none"
	case ProfileImagestore:
	default:
		return c, fmt.Errorf("profile: %q, want %s or %s", profile, ProfileZStack, ProfileImagestore)
	}
	return c, nil
}

// Load is LoadProfile(path, "").
func Load(path string) (Config, error) { return LoadProfile(path, "") }

// LoadProfile reads path (if non-empty) over the defaults of the profile,
// then applies the environment. The profile is, first found: profile (the
// -profile flag), IMAGESTORE_PROFILE, the file's profile key,
// DefaultProfile. Unknown keys in the file are errors, so typos do not
// pass silently.
func LoadProfile(path, profile string) (Config, error) {
	var body []byte
	if path != "" {
		b, err := os.ReadFile(path)
		if err != nil {
			return Config{}, fmt.Errorf("config: %w", err)
		}
		body = b
	}
	if profile == "" {
		profile, _ = os.LookupEnv("IMAGESTORE_PROFILE")
	}
	if profile == "" && len(body) > 0 {
		var p struct {
			Profile string `yaml:"profile"`
		}
		if err := yaml.Unmarshal(body, &p); err != nil {
			return Config{}, fmt.Errorf("config %s: %w", path, err)
		}
		profile = p.Profile
	}
	cfg, err := Defaults(profile)
	if err != nil {
		return cfg, err
	}
	// 0 until the file or the environment sets it: then the storage
	// type's default.
	cfg.GCGrace = 0
	if len(body) > 0 {
		dec := yaml.NewDecoder(bytes.NewReader(body))
		dec.KnownFields(true)
		// io.EOF: an empty file is a valid config.
		if err := dec.Decode(&cfg); err != nil && !errors.Is(err, io.EOF) {
			return cfg, fmt.Errorf("config %s: %w", path, err)
		}
	}
	// The file's own profile key loses to the flag and the environment.
	cfg.Profile = profile
	if cfg.Profile == "" {
		cfg.Profile = DefaultProfile
	}
	if err := cfg.ApplyEnv(os.LookupEnv); err != nil {
		return cfg, err
	}
	if cfg.GCGrace == 0 {
		cfg.GCGrace = DefaultGCGrace(cfg.Storage.Type)
	}
	return cfg, nil
}

// envVars maps IMAGESTORE_* variables to setters.
func (c *Config) envVars() map[string]func(string) error {
	str := func(p *string) func(string) error { return func(v string) error { *p = v; return nil } }
	dur := func(p *time.Duration) func(string) error {
		return func(v string) error {
			d, err := time.ParseDuration(v)
			*p = d
			return err
		}
	}
	num := func(p *int) func(string) error {
		return func(v string) error {
			n, err := strconv.Atoi(v)
			*p = n
			return err
		}
	}
	boolean := func(p *bool) func(string) error {
		return func(v string) error {
			b, err := strconv.ParseBool(v)
			*p = b
			return err
		}
	}
	size := func(p *ByteSize) func(string) error {
		return func(v string) error {
			n, err := ParseByteSize(v)
			*p = n
			return err
		}
	}
	return map[string]func(string) error{
		"IMAGESTORE_ROOT":               str(&c.Root),
		"IMAGESTORE_LISTEN":             str(&c.Listen),
		"IMAGESTORE_REGISTRY_LISTEN":    str(&c.RegistryListen),
		"IMAGESTORE_TLS_CERT":           str(&c.TLS.Cert),
		"IMAGESTORE_TLS_KEY":            str(&c.TLS.Key),
		"IMAGESTORE_AGENT_TLS_CERT":     str(&c.AgentTLS.Cert),
		"IMAGESTORE_AGENT_TLS_KEY":      str(&c.AgentTLS.Key),
		"IMAGESTORE_AGENT_TLS_PLAIN":    boolean(&c.AgentTLS.Plain),
		"IMAGESTORE_REGISTRY_TLS_CERT":  str(&c.RegistryTLS.Cert),
		"IMAGESTORE_REGISTRY_TLS_KEY":   str(&c.RegistryTLS.Key),
		"IMAGESTORE_REGISTRY_TLS_PLAIN": boolean(&c.RegistryTLS.Plain),
		"IMAGESTORE_SERVER_NAME":        str(&c.ServerName),
		// Read by LoadProfile before the defaults; listed so EnvNames has it.
		"IMAGESTORE_PROFILE":                  func(string) error { return nil },
		"IMAGESTORE_TOKEN":                    func(v string) error { c.Token = Secret(v); return nil },
		"IMAGESTORE_TOKEN_FILE":               str(&c.TokenFile),
		"IMAGESTORE_MAX_CONNECTIONS":          num(&c.MaxConnections),
		"IMAGESTORE_REGISTRY_MAX_CONNECTIONS": num(&c.RegistryMaxConnections),
		"IMAGESTORE_QUOTA":                    size(&c.Quota),
		"IMAGESTORE_PARALLELISM_DEGREE":       num(&c.ParallelismDegree),
		"IMAGESTORE_UPLOAD_DIR_EXPIRY":        dur(&c.UploadDirExpiry),
		"IMAGESTORE_LOG_LEVEL":                str(&c.LogLevel),
		"IMAGESTORE_LOG_FORMAT":               str(&c.LogFormat),
		"IMAGESTORE_JOB_RETENTION":            dur(&c.JobRetention),
		"IMAGESTORE_CALLBACK_RETRIES":         num(&c.CallbackRetries),
		"IMAGESTORE_CALLBACK_MAX_DELAY":       dur(&c.CallbackMaxDelay),
		"IMAGESTORE_VERIFY_INTERVAL":          dur(&c.VerifyInterval),
		"IMAGESTORE_GC_GRACE":                 dur(&c.GCGrace),
		"IMAGESTORE_KNOWN_HOSTS_FILE":         str(&c.KnownHostsFile),
		"IMAGESTORE_NBD_PORT_RANGE":           str(&c.NBD.PortRange),
		"IMAGESTORE_NBD_BIND":                 str(&c.NBD.Bind),
		"IMAGESTORE_NBD_CLIENT_AUTH":          str(&c.NBD.ClientAuth),
		"IMAGESTORE_REPLICATION_MAX_TASKS":    num(&c.Replication.MaxTasks),
		"IMAGESTORE_EXPORT_EXPIRY":            dur(&c.ExportExpiry),
		"IMAGESTORE_PID_FILE":                 str(&c.PIDFile),
		"IMAGESTORE_STORAGE_TYPE":             str(&c.Storage.Type),
		"IMAGESTORE_STORAGE_ENDPOINT":         str(&c.Storage.Endpoint),
		"IMAGESTORE_STORAGE_BUCKET":           str(&c.Storage.Bucket),
		"IMAGESTORE_STORAGE_PREFIX":           str(&c.Storage.Prefix),
		"IMAGESTORE_STORAGE_REGION":           str(&c.Storage.Region),
		"IMAGESTORE_STORAGE_PATH_STYLE":       boolean(&c.Storage.PathStyle),
		"IMAGESTORE_STORAGE_CREDENTIALS_FILE": str(&c.Storage.CredentialsFile),
		"IMAGESTORE_STORAGE_CA_FILE":          str(&c.Storage.CAFile),
		"IMAGESTORE_STORAGE_PART_SIZE":        size(&c.Storage.PartSize),
		"IMAGESTORE_STORAGE_CACHE_BYTES":      size(&c.Storage.CacheBytes),
		"IMAGESTORE_CONNECT_IP_ADDRESSES": func(v string) error {
			c.Connect.IPAddresses = strings.FieldsFunc(v, func(r rune) bool { return r == ',' || r == ' ' })
			return nil
		},
		"IMAGESTORE_ALLOWED_IMPORT_ROOTS": func(v string) error {
			c.AllowedImportRoots = filepath.SplitList(v)
			return nil
		},
	}
}

// ApplyEnv overrides fields from IMAGESTORE_* variables found by lookup.
func (c *Config) ApplyEnv(lookup func(string) (string, bool)) error {
	for name, set := range c.envVars() {
		if v, ok := lookup(name); ok {
			if err := set(v); err != nil {
				return fmt.Errorf("environment %s: %w", name, err)
			}
		}
	}
	return nil
}

// EnvNames lists the environment variables ApplyEnv reads.
func (c *Config) EnvNames() []string {
	var out []string
	for k := range c.envVars() {
		out = append(out, k)
	}
	return out
}

// ResolveToken reads TokenFile into Token when Token is empty.
func (c *Config) ResolveToken() error {
	if c.Token != "" || c.TokenFile == "" {
		return nil
	}
	b, err := os.ReadFile(c.TokenFile)
	if err != nil {
		return fmt.Errorf("token file: %w", err)
	}
	c.Token = Secret(strings.TrimSpace(string(b)))
	if c.Token == "" {
		return fmt.Errorf("token file %s is empty", c.TokenFile)
	}
	return nil
}

// Validate checks values that would otherwise fail late.
func (c *Config) Validate() error {
	var errs []error
	if c.Root == "" {
		errs = append(errs, errors.New("root: empty"))
	}
	if c.MaxConnections < 1 {
		errs = append(errs, fmt.Errorf("maxConnections: %d, must be positive", c.MaxConnections))
	}
	if c.RegistryMaxConnections < 1 {
		errs = append(errs, fmt.Errorf("registryMaxConnections: %d, must be positive", c.RegistryMaxConnections))
	}
	if c.ParallelismDegree < 1 {
		errs = append(errs, fmt.Errorf("parallelismDegree: %d, must be at least 1", c.ParallelismDegree))
	}
	switch c.Profile {
	case "", ProfileZStack, ProfileImagestore:
	default:
		errs = append(errs, fmt.Errorf("profile: %q, want %s or %s", c.Profile, ProfileZStack, ProfileImagestore))
	}
	if (c.TLS.Cert == "") != (c.TLS.Key == "") {
		errs = append(errs, errors.New("tls: cert and key must be set together"))
	}
	for _, l := range []struct {
		key string
		t   ListenerTLS
	}{{"agentTLS", c.AgentTLS}, {"registryTLS", c.RegistryTLS}} {
		if (l.t.Cert == "") != (l.t.Key == "") {
			errs = append(errs, fmt.Errorf("%s: cert and key must be set together", l.key))
		}
		if l.t.Plain && l.t.Cert != "" {
			errs = append(errs, fmt.Errorf("%s: plain and cert are exclusive", l.key))
		}
	}
	switch c.LogFormat {
	case "text", "json":
	default:
		errs = append(errs, fmt.Errorf("logFormat: %q, want text or json", c.LogFormat))
	}
	if _, err := ParseLogLevel(c.LogLevel); err != nil {
		errs = append(errs, err)
	}
	if c.CallbackRetries < 0 {
		errs = append(errs, fmt.Errorf("callbackRetries: %d is negative", c.CallbackRetries))
	}
	if c.MaxBodyBytes <= 0 {
		errs = append(errs, fmt.Errorf("maxBodyBytes: %d, must be positive", c.MaxBodyBytes))
	}
	if c.ExportExpiry < 0 {
		errs = append(errs, fmt.Errorf("exportExpiry: %v, must not be negative", c.ExportExpiry))
	}
	if c.UploadDirExpiry <= 0 {
		errs = append(errs, fmt.Errorf("uploadDirExpiry: %v, must be positive", c.UploadDirExpiry))
	}
	// An empty range disables NBD; a malformed one would otherwise only
	// show up as a warning and NBD commands failing much later.
	if c.NBD.PortRange != "" {
		if _, _, err := c.NBD.Ports(); err != nil {
			errs = append(errs, err)
		}
	}
	switch c.NBD.ClientAuth {
	case "", "auto", "psk", "none":
	default:
		errs = append(errs, fmt.Errorf("nbd.clientAuth: %q, want auto, psk or none", c.NBD.ClientAuth))
	}
	if err := c.Connect.validate(); err != nil {
		errs = append(errs, err)
	}
	if c.VerifySample < 0 || c.VerifySample > 1 {
		errs = append(errs, fmt.Errorf("verifySample: %v, want 0..1", c.VerifySample))
	}
	if c.GCGrace < 0 {
		errs = append(errs, fmt.Errorf("gcGrace: %v, must not be negative", c.GCGrace))
	}
	if err := c.Storage.validate(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// CheckFiles checks that the certificate and key each port serves can be
// read, and that storage.caFile holds certificates, naming the key that
// configures a missing one, so a daemon does not start half-served.
func (c Config) CheckFiles() error {
	var errs []error
	check := func(key, path string) {
		if path == "" {
			return
		}
		f, err := os.Open(path)
		if err != nil {
			hint := ""
			if c.Profile == ProfileZStack && (path == ZStackCertFile || path == ZStackKeyFile) {
				hint = " (the zstack profile's default: the management node deploys its certificate there; " +
					"to try the daemon without it use -profile imagestore)"
			}
			errs = append(errs, fmt.Errorf("%s: %w%s", key, err, hint))
			return
		}
		f.Close()
	}
	agentKey, regKey := "tls", "tls"
	if c.AgentTLS.Cert != "" {
		agentKey = "agentTLS"
	}
	if c.RegistryTLS.Cert != "" {
		regKey = "registryTLS"
	}
	a, r := c.AgentListenerTLS(), c.RegistryListenerTLS()
	check(agentKey+".cert", a.Cert)
	check(agentKey+".key", a.Key)
	if r != a {
		check(regKey+".cert", r.Cert)
		check(regKey+".key", r.Key)
	}
	if err := c.Storage.checkFiles(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// String renders the configuration as YAML with secrets redacted.
func (c Config) String() string {
	b, err := yaml.Marshal(c)
	if err != nil {
		return fmt.Sprintf("config: %v", err)
	}
	return string(b)
}
