package main

import (
	"errors"
	"flag"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"imagestore/agent/config"
)

// clearAgentEnv unsets the IMAGESTORE_* variables and S3 keys so the host's cannot leak in.
func clearAgentEnv(t *testing.T) {
	t.Helper()
	c := config.Default()
	names := append(c.EnvNames(), config.EnvS3AccessKey, config.EnvS3SecretKey, config.EnvAWSAccessKey, config.EnvAWSSecretKey)
	for _, n := range names {
		if _, ok := os.LookupEnv(n); ok {
			t.Setenv(n, "")
			os.Unsetenv(n)
		}
	}
}

func TestParseFlagsPrecedence(t *testing.T) {
	clearAgentEnv(t)
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "agent.yaml")
	if err := os.WriteFile(cfgPath, []byte("root: /file\nlisten: :1111\nparallelismDegree: 2\nlogLevel: warn\nquota: 1GiB\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tokFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokFile, []byte("from-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("IMAGESTORE_LISTEN", ":2222")
	t.Setenv("IMAGESTORE_PARALLELISM_DEGREE", "3")
	t.Setenv("IMAGESTORE_LOG_LEVEL", "error")

	for _, tc := range []struct {
		name  string
		args  []string
		check func(config.Config) bool
	}{
		{"file then env", []string{"-config", cfgPath}, func(c config.Config) bool {
			return c.Root == "/file" && c.Listen == ":2222" && c.ParallelismDegree == 3 && c.LogLevel == "error" && c.Quota == 1<<30
		}},
		{"flags win", []string{"-config", cfgPath, "-listen", ":3333", "-parallelism", "4", "-log-level", "debug", "-quota", "2GB"}, func(c config.Config) bool {
			return c.Root == "/file" && c.Listen == ":3333" && c.ParallelismDegree == 4 && c.LogLevel == "debug" && c.Quota == 2e9
		}},
		{"connection caps", []string{"-config", cfgPath, "-max-connections", "8", "-registry-max-connections", "9"}, func(c config.Config) bool {
			return c.MaxConnections == 8 && c.RegistryMaxConnections == 9
		}},
		{"token file", []string{"-config", cfgPath, "-token-file", tokFile}, func(c config.Config) bool { return c.Token == "from-file" }},
		{"token flag beats file", []string{"-config", cfgPath, "-token", "direct", "-token-file", tokFile}, func(c config.Config) bool { return c.Token == "direct" }},
		{"no file: defaults and env", nil, func(c config.Config) bool {
			return c.Root == "./data" && c.Listen == ":2222" && c.RegistryListen == ":8000"
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, _, err := parseFlags(tc.args, io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			if !tc.check(cfg) {
				t.Fatalf("config %+v", cfg)
			}
		})
	}
}

func TestParseFlagsErrors(t *testing.T) {
	clearAgentEnv(t)
	dir := t.TempDir()
	noBucket := filepath.Join(dir, "nobucket.yaml")
	noKeys := filepath.Join(dir, "nokeys.yaml")
	for p, body := range map[string]string{
		noBucket: "profile: imagestore\nstorage:\n  type: s3\n  endpoint: http://127.0.0.1:7480\n",
		noKeys:   "profile: imagestore\nstorage:\n  type: s3\n  endpoint: http://127.0.0.1:7480\n  bucket: b\n",
	} {
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"negative parallelism", []string{"-parallelism", "-1"}, "parallelismDegree: -1, must be at least 1"},
		{"zero connection cap", []string{"-registry-max-connections", "0"}, "registryMaxConnections: 0, must be positive"},
		{"unknown log level", []string{"-log-level", "chatty"}, `logLevel: "chatty"`},
		{"tls cert without key", []string{"-tls-cert", "/c.pem"}, "tls: cert and key must be set together"},
		{"bad quota", []string{"-quota", "lots"}, "-quota: byte size"},
		{"stray argument", []string{"serve"}, "unexpected arguments"},
		{"unknown flag", []string{"-nope"}, "flag provided but not defined"},
		{"missing config", []string{"-config", "/nonexistent/agent.yaml"}, "no such file"},
		{"empty token file", []string{"-token-file", os.DevNull}, "is empty"},
		{"s3 without bucket", []string{"-config", noBucket}, "storage.bucket: empty"},
		{"s3 without keys", []string{"-config", noKeys}, "storage credentials: type s3 needs an access key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := parseFlags(tc.args, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
	if _, _, err := parseFlags([]string{"-h"}, io.Discard); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("-h: %v", err)
	}
}

func TestPrintConfigRedacts(t *testing.T) {
	clearAgentEnv(t)
	cmd := exec.Command(agentBin, "-print-config", "-token", "super-secret-xyz", "-parallelism", "6")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if strings.Contains(string(out), "super-secret-xyz") || !strings.Contains(string(out), "token: <redacted>") ||
		!strings.Contains(string(out), "parallelismDegree: 6") {
		t.Fatalf("print-config:\n%s", out)
	}

	// S3 keys from the environment: resolved, never printed.
	cfgPath := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(cfgPath, []byte("profile: imagestore\nstorage:\n  type: s3\n  endpoint: http://127.0.0.1:7480\n  bucket: b\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	const ak, sk = "AKIDPRINTCONFIG0001", "secret-key-print-config-0001"
	cmd = exec.Command(agentBin, "-print-config", "-config", cfgPath)
	cmd.Env = append(os.Environ(), config.EnvAWSAccessKey+"="+ak, config.EnvAWSSecretKey+"="+sk)
	out, err = cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if strings.Contains(string(out), ak) || strings.Contains(string(out), sk) || !strings.Contains(string(out), "type: s3") ||
		!strings.Contains(string(out), "gcGrace: 24h0m0s") {
		t.Fatalf("print-config of an s3 store:\n%s", out)
	}
}
