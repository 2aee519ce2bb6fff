// Package s3store keeps the blob store's bytes in an S3 bucket (Ceph RGW
// first): committed blobs, resumable ingests as multipart uploads, image
// records created only if absent, the mutable settings object, a sweeper
// for abandoned uploads, and ranged reads through a bounded local cache.
// It stores; the rules (names, quota, holds, grace, GC and verify policy)
// stay in package blobstore. See docs/blobstore.md, "S3 backend".
package s3store

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"imagestore/internal/redact"
	"imagestore/internal/retry"
	"imagestore/internal/tlsconf"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/smithy-go"
	"github.com/aws/smithy-go/middleware"
	"github.com/opencontainers/go-digest"
)

// Options configure a Backend.
type Options struct {
	// Endpoint is the S3 service URL, http:// or https:// (e.g.
	// "http://127.0.0.1:7480" for a local RGW).
	Endpoint string
	Bucket   string
	// Prefix places the store under a key prefix ("" = bucket root), so
	// several stores can share a bucket. A trailing "/" is added.
	Prefix string
	// Region is signed into every request (default "us-east-1", which RGW
	// accepts whatever its zonegroup).
	Region string
	// PathStyle addresses the bucket as endpoint/bucket/key instead of
	// bucket.endpoint/key; RGW without wildcard DNS needs it.
	PathStyle bool
	AccessKey redact.Secret
	SecretKey redact.Secret
	// CAFile is a PEM file of the CAs trusted for an https endpoint ("":
	// the system roots).
	CAFile string
	// PartSize is the multipart part size, the unit of the writer's
	// buffers and of what a crash can cost to resend (default 16 MiB; at
	// least 5 MiB, S3's minimum; 10,000 parts of 16 MiB reach 156 GiB).
	PartSize int64
	// PartsInFlight is how many parts of one ingest upload at once while
	// the next is filled (default 3): an ingest holds PartsInFlight+1
	// part buffers.
	PartsInFlight int
	// CacheBytes caps the in-memory read cache (default 64 MiB; < 0
	// disables it). CacheChunk is its unit (default 1 MiB).
	CacheBytes, CacheChunk int64
	// IngestExpiry: an ingest whose objects and multipart upload saw no
	// activity for this long is aborted by Sweep (default 24 h).
	IngestExpiry time.Duration
	// PinTTL is how long a commit of content already stored protects the
	// blob against a GC on another agent that checked it just before
	// (pins.go); default 10 min. A GC gives up a delete after PinTTL/2.
	PinTTL time.Duration
	// ReadStall: a ranged GET that delivers no byte for this long (no
	// response, or a body that stops while the connection stays up) is
	// abandoned and retried (default 1 min).
	ReadStall time.Duration
	// Retry is the policy for transient failures (network errors, 5xx,
	// 429, SlowDown). The zero value: 12 tries, 250 ms doubling to 15 s
	// (≈ 2 min in all: enough for an RGW restart).
	Retry  retry.Policy
	Logger *slog.Logger
	// Now is the clock (tests inject one to age uploads).
	Now func() time.Time
}

const (
	minPartSize          = 5 << 20
	defaultPartSize      = 16 << 20
	defaultPartsInFlight = 3
	defaultCacheBytes    = 64 << 20
	defaultCacheChunk    = 1 << 20
	defaultIngestExpiry  = 24 * time.Hour
	maxParts             = 10000
)

// Errors New returns when the bucket cannot be used; each is wrapped with
// the server's answer.
var (
	ErrUnreachable = errors.New("s3store: endpoint unreachable")
	ErrCredentials = errors.New("s3store: credentials rejected")
	ErrNoBucket    = errors.New("s3store: bucket does not exist")
	ErrConfig      = errors.New("s3store: bad configuration")
	// ErrCertificate: the https endpoint's certificate is not trusted (not
	// issued by a CA of CAFile, or of the system when CAFile is unset) or
	// does not name the endpoint's host.
	ErrCertificate = errors.New("s3store: endpoint certificate not trusted")
)

// Backend is a blob store's storage in one bucket under one prefix. It is
// safe for concurrent use.
type Backend struct {
	cli    *s3.Client
	bucket string
	prefix string
	opts   Options
	log    *slog.Logger
	retry  retry.Policy
	cache  *chunkCache
	ra     *readahead // sequential reads (stream.go)
	stats  *statCache // opened blobs' size and ETag, briefly (statcache.go)
	now    func() time.Time

	// copyLimit is the largest object one CopyObject copies and copyPart
	// the range of one UploadPartCopy above it; tests lower both.
	copyLimit, copyPart int64
	// beforeDelete, if set, runs in DeleteBlob just before the blob's
	// DELETE; tests use it to force an interleaving.
	beforeDelete func(h string)
	// pinsOff skips the pin protocol: only the test that shows what it
	// prevents sets it.
	pinsOff bool

	mu      sync.Mutex
	active  map[string]bool               // ingest refs with an open Writer in this process
	ended   map[string]int64              // per ingest ref: the Offset its last Writer here reached (see OpenIngest)
	commits map[digest.Digest]*commitLock // digests being committed in this process
}

// New configures the client and checks that the bucket answers: a bad
// endpoint is ErrUnreachable, an untrusted certificate ErrCertificate, bad
// keys ErrCredentials, a missing bucket ErrNoBucket.
func New(ctx context.Context, opts Options) (*Backend, error) {
	u, err := url.Parse(opts.Endpoint)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("%w: endpoint %q is not an http(s) URL", ErrConfig, redact.URL(opts.Endpoint))
	}
	if opts.Bucket == "" {
		return nil, fmt.Errorf("%w: no bucket", ErrConfig)
	}
	prefix := strings.Trim(opts.Prefix, "/")
	for _, seg := range strings.Split(prefix, "/") {
		if prefix != "" && (seg == "" || seg == "." || seg == "..") {
			return nil, fmt.Errorf("%w: prefix %q", ErrConfig, opts.Prefix)
		}
	}
	if prefix != "" {
		prefix += "/"
	}
	if opts.Region == "" {
		opts.Region = "us-east-1"
	}
	if opts.PartSize == 0 {
		opts.PartSize = defaultPartSize
	}
	if opts.PartsInFlight <= 0 {
		opts.PartsInFlight = defaultPartsInFlight
	}
	if opts.ReadStall <= 0 {
		opts.ReadStall = time.Minute
	}
	if opts.PartSize < minPartSize {
		return nil, fmt.Errorf("%w: part size %d is under S3's minimum of 5 MiB", ErrConfig, opts.PartSize)
	}
	if opts.CacheBytes == 0 {
		opts.CacheBytes = defaultCacheBytes
	}
	if opts.CacheChunk <= 0 {
		opts.CacheChunk = defaultCacheChunk
	}
	if opts.IngestExpiry <= 0 {
		opts.IngestExpiry = defaultIngestExpiry
	}
	if opts.PinTTL <= 0 {
		opts.PinTTL = defaultPin
	}
	if opts.Retry.Attempts == 0 {
		opts.Retry = retry.Policy{Attempts: 12, Initial: 250 * time.Millisecond, Max: 15 * time.Second, Jitter: 0.2}
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.Default()
	}
	logger = logger.With("component", "s3store", "bucket", opts.Bucket, "prefix", prefix)
	if opts.Now == nil {
		opts.Now = time.Now
	}
	tr := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: 2 * time.Minute,
		ExpectContinueTimeout: time.Second,
	}
	if opts.CAFile != "" {
		tc, err := tlsconf.ClientFile(opts.CAFile, "")
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrConfig, err)
		}
		tr.TLSClientConfig = tc
	}
	ak, sk := opts.AccessKey.Reveal(), opts.SecretKey.Reveal()
	cli := s3.New(s3.Options{
		BaseEndpoint: aws.String(opts.Endpoint),
		Region:       opts.Region,
		UsePathStyle: opts.PathStyle,
		Credentials: aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
			return aws.Credentials{AccessKeyID: ak, SecretAccessKey: sk, Source: "s3store"}, nil
		}),
		// RGW 16.2 rejects the SDK's default aws-chunked trailing
		// checksums; we hash everything ourselves and send Content-MD5.
		RequestChecksumCalculation: aws.RequestChecksumCalculationWhenRequired,
		ResponseChecksumValidation: aws.ResponseChecksumValidationWhenRequired,
		HTTPClient:                 &http.Client{Transport: tr},
		Retryer:                    aws.NopRetryer{}, // ours: opts.Retry
		// Bodies are integrity-checked by Content-MD5 and by our own
		// sha256; signing their sha256 too would hash every byte twice.
		APIOptions: []func(*middleware.Stack) error{v4.SwapComputePayloadSHA256ForUnsignedPayloadMiddleware},
	})
	b := &Backend{
		cli:     cli,
		bucket:  opts.Bucket,
		prefix:  prefix,
		opts:    opts,
		log:     logger,
		now:     opts.Now,
		active:  map[string]bool{},
		ended:   map[string]int64{},
		commits: map[digest.Digest]*commitLock{},

		copyLimit: copyObjectLimit,
		copyPart:  copyPartSize,
	}
	b.retry = opts.Retry
	b.retry.Retryable = transient
	b.retry.OnRetry = func(attempt int, err error, wait time.Duration) {
		b.log.Warn("s3 request failed, retrying", "attempt", attempt+1, "wait", wait, "err", err)
	}
	if opts.CacheBytes > 0 {
		b.cache = newChunkCache(opts.CacheBytes)
	}
	b.ra = newReadahead()
	b.stats = newStatCache(statTTL, statMax, b.now)
	if err := b.check(ctx); err != nil {
		return nil, err
	}
	return b, nil
}

// check lists one key: unlike HeadBucket, a GET carries the error code
// that tells bad keys from a missing bucket.
func (b *Backend) check(ctx context.Context) error {
	p := b.retry
	p.Attempts = min(p.Attempts, 3)
	err := p.Do(ctx, func(ctx context.Context, _ int) error {
		_, err := b.cli.ListObjectsV2(ctx, &s3.ListObjectsV2Input{Bucket: &b.bucket, Prefix: aws.String(b.prefix), MaxKeys: aws.Int32(1)})
		return err
	})
	if err == nil {
		return nil
	}
	ep := redact.URL(b.opts.Endpoint)
	if badCertificate(err) {
		// Say which CAs judged it: the usual fix is the CA file.
		trust := "the system's CAs: no CA file given"
		if b.opts.CAFile != "" {
			trust = "the CAs in " + b.opts.CAFile
		}
		return fmt.Errorf("%w: %s (checked against %s): %w", ErrCertificate, ep, trust, err)
	}
	switch code := errCode(err); {
	case code == "NoSuchBucket" || (code == "" && httpStatus(err) == http.StatusNotFound):
		return fmt.Errorf("%w: %q at %s: %w", ErrNoBucket, b.bucket, ep, err)
	case code == "InvalidAccessKeyId" || code == "SignatureDoesNotMatch" || code == "AccessDenied" || httpStatus(err) == http.StatusForbidden:
		return fmt.Errorf("%w by %s for bucket %q: %w", ErrCredentials, ep, b.bucket, err)
	case httpStatus(err) == 0 && ctx.Err() == nil:
		return fmt.Errorf("%w: %s: %w", ErrUnreachable, ep, err)
	default:
		return fmt.Errorf("s3store: bucket %q at %s: %w", b.bucket, ep, err)
	}
}

// do runs one S3 call under the retry policy.
func (b *Backend) do(ctx context.Context, fn func(ctx context.Context) error) error {
	return b.retry.Do(ctx, func(ctx context.Context, _ int) error { return fn(ctx) })
}

// errCode is the S3 error code ("NoSuchKey", "PreconditionFailed", ...).
func errCode(err error) string {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		return ae.ErrorCode()
	}
	return ""
}

// httpStatus is the response's status, 0 when there was no response.
func httpStatus(err error) int {
	var re *awshttp.ResponseError
	if errors.As(err, &re) {
		return re.HTTPStatusCode()
	}
	return 0
}

// transient: worth another try. Network errors (no response), 5xx, 429,
// and the codes S3 servers use for overload and timeouts; not a
// certificate we do not trust.
func transient(err error) bool {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) || badCertificate(err) {
		return false
	}
	switch errCode(err) {
	case "SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed":
		return true
	}
	st := httpStatus(err)
	if st == 0 {
		var ae smithy.APIError
		// An API error without a response status is a client-side
		// validation or serialization failure: never transient.
		return !errors.As(err, &ae) || errCode(err) == ""
	}
	return st >= 500 || st == http.StatusTooManyRequests
}

// badCertificate: the TLS handshake failed verifying the server's
// certificate.
func badCertificate(err error) bool {
	var ve *tls.CertificateVerificationError
	return errors.As(err, &ve)
}

func isNotFound(err error) bool {
	switch errCode(err) {
	case "NoSuchKey", "NotFound":
		return true
	}
	return httpStatus(err) == http.StatusNotFound && errCode(err) != "NoSuchBucket"
}

// uploadGone: the multipart upload no longer exists. RGW answers ListParts
// of an aborted upload with NoSuchKey where AWS says NoSuchUpload.
func uploadGone(err error) bool {
	return errCode(err) == "NoSuchUpload" || errCode(err) == "NoSuchKey"
}

func isPreconditionFailed(err error) bool {
	return errCode(err) == "PreconditionFailed" || httpStatus(err) == http.StatusPreconditionFailed
}

type commitLock struct {
	mu   sync.Mutex
	refs int
}

// lockDigest serialises this process's commits of one digest, so that of
// concurrent commits of the same content exactly one creates the blob.
func (b *Backend) lockDigest(d digest.Digest) (unlock func()) {
	b.mu.Lock()
	l := b.commits[d]
	if l == nil {
		l = &commitLock{}
		b.commits[d] = l
	}
	l.refs++
	b.mu.Unlock()
	l.mu.Lock()
	return func() {
		l.mu.Unlock()
		b.mu.Lock()
		if l.refs--; l.refs == 0 {
			delete(b.commits, d)
		}
		b.mu.Unlock()
	}
}
