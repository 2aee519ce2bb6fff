package config

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"
	"unicode"

	"imagestore/internal/tlsconf"
)

// Storage types.
const (
	StorageLocal = "local"
	StorageS3    = "s3"
)

// Commit grace defaults (gcGrace 0 = the storage type's). On local disk one
// agent owns the store and holds what it is ingesting, so a short grace
// covers the time between a commit and its record. A bucket may be shared
// by several agents, whose ingests no other agent can see: like the other
// stores that keep blobs on S3 (restic, kopia, Proxmox Backup Server), GC
// leaves alone every blob committed in the last day.
const (
	DefaultLocalGCGrace = 10 * time.Minute
	DefaultS3GCGrace    = 24 * time.Hour
)

// The environment variables S3 credentials are read from (a pair, both
// set or neither). IMAGESTORE_S3_* win over the AWS_* names, which are
// read so a daemon can run where AWS tools are configured.
const (
	EnvS3AccessKey  = "IMAGESTORE_S3_ACCESS_KEY"
	EnvS3SecretKey  = "IMAGESTORE_S3_SECRET_KEY"
	EnvAWSAccessKey = "AWS_ACCESS_KEY_ID"
	EnvAWSSecretKey = "AWS_SECRET_ACCESS_KEY"
)

// Storage is where the blob store keeps its bytes: the root directory
// (local, the default) or an S3 bucket (Ceph RGW). Either way the root
// directory keeps the agent's own state (jobs, upload dirs, exports, NBD
// targets, registry sessions).
type Storage struct {
	// Type is local or s3 ("" = local).
	Type string `yaml:"type"`
	// Endpoint is the S3 service URL, http:// or https://.
	Endpoint string `yaml:"endpoint"`
	Bucket   string `yaml:"bucket"`
	// Prefix places the store under a key prefix of the bucket, so several
	// stores can share one bucket (agents with the same bucket and prefix
	// share one store).
	Prefix string `yaml:"prefix"`
	// Region is signed into requests ("" = us-east-1, which RGW accepts).
	Region string `yaml:"region"`
	// PathStyle addresses endpoint/bucket/key instead of
	// bucket.endpoint/key (RGW without wildcard DNS needs it).
	PathStyle bool `yaml:"pathStyle"`
	// CredentialsFile holds the access key pair (see ParseCredentials);
	// otherwise the keys come from the environment (EnvS3AccessKey, ...).
	CredentialsFile string `yaml:"credentialsFile"`
	// CredentialsProfile is the section of CredentialsFile to use
	// ("" = default).
	CredentialsProfile string `yaml:"credentialsProfile"`
	// CAFile is a PEM file of the CAs trusted for an https endpoint
	// ("" = the system roots).
	CAFile string `yaml:"caFile"`
	// PartSize is the multipart part size: an ingest holds 4 part buffers
	// (3 uploading, 1 filling), which is also what a crash can cost to
	// send again (0 = 16 MiB; 5 MiB to 5 GiB).
	PartSize ByteSize `yaml:"partSize"`
	// CacheBytes caps the in-memory cache of blob ranges read from the
	// bucket (0 = 64 MiB).
	CacheBytes ByteSize `yaml:"cacheBytes"`

	// AccessKey and SecretKey are resolved by ResolveStorageCredentials
	// from CredentialsFile or the environment; never in the file, never
	// printed.
	AccessKey Secret `yaml:"-"`
	SecretKey Secret `yaml:"-"`
	// credSource names where the keys came from, for errors and the log.
	credSource string
}

// IsS3 reports whether the store is in a bucket.
func (s Storage) IsS3() bool { return s.Type == StorageS3 }

// CredentialSource says where the S3 keys came from (a file, or the
// environment variables' names); "" before ResolveStorageCredentials.
func (s Storage) CredentialSource() string { return s.credSource }

// DefaultGCGrace is the commit grace of a storage type.
func DefaultGCGrace(storageType string) time.Duration {
	if storageType == StorageS3 {
		return DefaultS3GCGrace
	}
	return DefaultLocalGCGrace
}

const (
	minPartSize = 5 << 20
	maxPartSize = 5 << 30
)

// validate checks the storage settings.
func (s Storage) validate() error {
	var errs []error
	switch s.Type {
	case "", StorageLocal:
		// S3 keys without type s3 are a forgotten type, not a local store.
		for _, f := range []struct{ key, v string }{
			{"endpoint", s.Endpoint}, {"bucket", s.Bucket}, {"prefix", s.Prefix}, {"region", s.Region},
			{"credentialsFile", s.CredentialsFile}, {"caFile", s.CAFile},
		} {
			if f.v != "" {
				errs = append(errs, fmt.Errorf("storage.%s is set but storage.type is local: set storage.type: s3 to keep the store in a bucket", f.key))
			}
		}
		return errors.Join(errs...)
	case StorageS3:
	default:
		return fmt.Errorf("storage.type: %q, want local or s3", s.Type)
	}
	if s.Bucket == "" {
		errs = append(errs, errors.New("storage.bucket: empty; type s3 needs the bucket to keep the store in"))
	}
	if s.Endpoint == "" {
		errs = append(errs, errors.New("storage.endpoint: empty; type s3 needs the S3 service URL, e.g. https://rgw.example:7480"))
	} else if u, err := url.Parse(s.Endpoint); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		errs = append(errs, errors.New("storage.endpoint: not an http:// or https:// URL"))
	} else if u.User != nil {
		errs = append(errs, errors.New("storage.endpoint: holds credentials; put them in storage.credentialsFile or the environment"))
	} else if u.RawQuery != "" || u.Fragment != "" {
		errs = append(errs, errors.New("storage.endpoint: has a query or fragment"))
	} else if u.Scheme == "http" && s.CAFile != "" {
		errs = append(errs, errors.New("storage.caFile is set but storage.endpoint is http://; use https://"))
	}
	for _, seg := range strings.Split(strings.Trim(s.Prefix, "/"), "/") {
		if s.Prefix != "" && (seg == "" || seg == "." || seg == "..") {
			errs = append(errs, fmt.Errorf("storage.prefix: %q has an empty, . or .. component", s.Prefix))
			break
		}
	}
	if s.PartSize != 0 && (s.PartSize < minPartSize || s.PartSize > maxPartSize) {
		errs = append(errs, fmt.Errorf("storage.partSize: %d, want 5 MiB to 5 GiB (S3's part limits)", s.PartSize))
	}
	if s.CredentialsProfile != "" && s.CredentialsFile == "" {
		errs = append(errs, errors.New("storage.credentialsProfile is set without storage.credentialsFile"))
	}
	return errors.Join(errs...)
}

// checkFiles checks the files the storage settings name: the CA file
// parses as PEM certificates (the credentials file is read by
// ResolveStorageCredentials).
func (s Storage) checkFiles() error {
	if !s.IsS3() || s.CAFile == "" {
		return nil
	}
	if _, err := tlsconf.ClientFile(s.CAFile, ""); err != nil {
		return fmt.Errorf("storage.caFile: %w", err)
	}
	return nil
}

// envCredentials reads the first complete pair of S3 key variables. A
// variable set without its partner is an error (a typo would otherwise
// fall through to another source).
func envCredentials(lookup func(string) (string, bool)) (ak, sk, source string, err error) {
	for _, p := range [][2]string{{EnvS3AccessKey, EnvS3SecretKey}, {EnvAWSAccessKey, EnvAWSSecretKey}} {
		a, aok := lookup(p[0])
		s, sok := lookup(p[1])
		a, s = strings.TrimSpace(a), strings.TrimSpace(s)
		aok, sok = aok && a != "", sok && s != ""
		switch {
		case aok && sok:
			return a, s, "environment " + p[0] + "/" + p[1], nil
		case aok:
			return "", "", "", fmt.Errorf("environment: %s is set without %s", p[0], p[1])
		case sok:
			return "", "", "", fmt.Errorf("environment: %s is set without %s", p[1], p[0])
		}
	}
	return "", "", "", nil
}

// ResolveStorageCredentials fills Storage.AccessKey and SecretKey for an
// S3 store, from Storage.CredentialsFile or from the environment (lookup:
// EnvS3AccessKey/EnvS3SecretKey, else EnvAWSAccessKey/EnvAWSSecretKey).
// Both sources at once, neither, a half pair, or a credentials file that
// others may read are errors. A local store needs no keys: nothing is read.
func (c *Config) ResolveStorageCredentials(lookup func(string) (string, bool)) error {
	s := &c.Storage
	if !s.IsS3() {
		return nil
	}
	ak, sk, envSource, err := envCredentials(lookup)
	if err != nil {
		return fmt.Errorf("storage credentials: %w", err)
	}
	switch {
	case s.CredentialsFile != "" && envSource != "":
		return fmt.Errorf("storage credentials: both storage.credentialsFile (%s) and the %s are set; use one", s.CredentialsFile, envSource)
	case s.CredentialsFile != "":
		ak, sk, err = readCredentialsFile(s.CredentialsFile, s.CredentialsProfile)
		if err != nil {
			return fmt.Errorf("storage.credentialsFile: %w", err)
		}
		s.credSource = "file " + s.CredentialsFile
	case envSource != "":
		s.credSource = envSource
	default:
		return fmt.Errorf("storage credentials: type s3 needs an access key: set storage.credentialsFile, or %s and %s (or %s and %s)",
			EnvS3AccessKey, EnvS3SecretKey, EnvAWSAccessKey, EnvAWSSecretKey)
	}
	s.AccessKey, s.SecretKey = Secret(ak), Secret(sk)
	return nil
}

// maxCredentialsFile bounds what readCredentialsFile reads.
const maxCredentialsFile = 64 << 10

// readCredentialsFile reads an access key pair from path: a regular file
// no other user may read (mode o-rwx), in ParseCredentials' format.
func readCredentialsFile(path, profile string) (ak, sk string, err error) {
	f, err := os.Open(path)
	if err != nil {
		return "", "", err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", "", err
	}
	if !fi.Mode().IsRegular() {
		return "", "", fmt.Errorf("%s is not a regular file", path)
	}
	if fi.Mode().Perm()&0o007 != 0 {
		return "", "", fmt.Errorf("%s is readable or writable by other users (mode %04o); chmod o-rwx it", path, fi.Mode().Perm())
	}
	if fi.Size() > maxCredentialsFile {
		return "", "", fmt.Errorf("%s is %d bytes, more than a credentials file holds (%d)", path, fi.Size(), maxCredentialsFile)
	}
	b := make([]byte, fi.Size())
	if _, err := f.ReadAt(b, 0); err != nil {
		return "", "", err
	}
	ak, sk, err = ParseCredentials(b, profile)
	if err != nil {
		return "", "", fmt.Errorf("%s: %w", path, err)
	}
	return ak, sk, nil
}

// ParseCredentials reads an access key pair in the AWS shared-credentials
// format (what ~/.aws/credentials and most S3 tools use):
//
//	[default]
//	aws_access_key_id = AKIA...
//	aws_secret_access_key = ...
//
// profile picks the section ("" = default); lines before any section
// header belong to default. Blank lines and lines starting with # or ;
// are comments; other keys of the format (region, output) are ignored,
// aws_session_token is refused (temporary credentials expire under a
// daemon), values with control characters are refused. Errors name lines
// and keys, never a value.
func ParseCredentials(b []byte, profile string) (ak, sk string, err error) {
	if profile == "" {
		profile = "default"
	}
	section := "default"
	found := false
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 0, 4096), maxCredentialsFile)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
			continue
		case line[0] == '[':
			name, ok := strings.CutSuffix(line[1:], "]")
			name = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(name), "profile "))
			if !ok || name == "" {
				return "", "", fmt.Errorf("line %d: malformed section header", n)
			}
			section = name
			continue
		}
		key, val, ok := strings.Cut(line, "=")
		if !ok {
			return "", "", fmt.Errorf("line %d: want key = value", n)
		}
		if section != profile {
			continue
		}
		key, val = strings.ToLower(strings.TrimSpace(key)), strings.TrimSpace(val)
		if strings.ContainsFunc(val, unicode.IsControl) {
			return "", "", fmt.Errorf("line %d: the value has a control character", n)
		}
		switch key {
		case "aws_access_key_id":
			ak, found = val, true
		case "aws_secret_access_key":
			sk, found = val, true
		case "aws_session_token":
			return "", "", fmt.Errorf("line %d: aws_session_token: temporary credentials are not supported; give the daemon a key pair of its own", n)
		}
	}
	if err := sc.Err(); err != nil {
		return "", "", err
	}
	switch {
	case !found:
		return "", "", fmt.Errorf("no aws_access_key_id or aws_secret_access_key in section [%s]", profile)
	case ak == "":
		return "", "", fmt.Errorf("section [%s] has no aws_access_key_id", profile)
	case sk == "":
		return "", "", fmt.Errorf("section [%s] has no aws_secret_access_key", profile)
	}
	return ak, sk, nil
}
