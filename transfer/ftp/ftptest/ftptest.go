// Package ftptest runs a real FTP server for tests: Debian's vsftpd on
// 127.0.0.1, serving a temporary directory to anonymous clients
// (read-only, passive mode), as the user running the test.
package ftptest

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"imagestore/internal/lockedbuf"
	"imagestore/internal/testwait"
)

// Server is a running vsftpd.
type Server struct {
	Addr string // 127.0.0.1:port
	Dir  string // what anonymous clients see as /
	log  *lockedbuf.Buffer
}

// URL is the ftp:// URL of path (relative to Dir).
func (s *Server) URL(path string) string { return "ftp://" + s.Addr + "/" + path }

// Log is what vsftpd wrote to stderr and its log file.
func (s *Server) Log() string {
	b, _ := os.ReadFile(filepath.Join(filepath.Dir(s.Dir), "vsftpd.log"))
	return s.log.String() + string(b)
}

// freePorts returns n consecutive free TCP ports on 127.0.0.1.
func freePorts(t testing.TB, n int) int {
	t.Helper()
	for range 50 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		base := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		if base+n > 65535 {
			continue
		}
		ok := true
		for p := base; p < base+n && ok; p++ {
			l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
			if err != nil {
				ok = false
				continue
			}
			l.Close()
		}
		if ok {
			return base
		}
	}
	t.Fatal("no free port range")
	return 0
}

// Start runs vsftpd until the test ends. A missing vsftpd fails the test
// (.ci/deps installs it).
func Start(t testing.TB) *Server {
	t.Helper()
	bin, err := exec.LookPath("vsftpd")
	if err != nil {
		if _, serr := os.Stat("/usr/sbin/vsftpd"); serr != nil {
			t.Fatalf("vsftpd not installed (.ci/deps installs it): %v", err)
		}
		bin = "/usr/sbin/vsftpd"
	}
	base := t.TempDir()
	s := &Server{Dir: filepath.Join(base, "root"), log: &lockedbuf.Buffer{}}
	empty := filepath.Join(base, "empty")
	for _, d := range []string{s.Dir, empty} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	ports := freePorts(t, 12)
	s.Addr = "127.0.0.1:" + strconv.Itoa(ports)
	conf := filepath.Join(base, "vsftpd.conf")
	cfg := fmt.Sprintf(`listen=YES
listen_ipv6=NO
listen_address=127.0.0.1
listen_port=%d
anonymous_enable=YES
local_enable=NO
write_enable=NO
anon_root=%s
no_anon_password=YES
pasv_enable=YES
pasv_min_port=%d
pasv_max_port=%d
pasv_address=127.0.0.1
background=NO
secure_chroot_dir=%s
seccomp_sandbox=NO
run_as_launching_user=YES
xferlog_enable=YES
vsftpd_log_file=%s
`, ports, s.Dir, ports+1, ports+11, empty, filepath.Join(base, "vsftpd.log"))
	if err := os.WriteFile(conf, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, conf)
	cmd.Stdout, cmd.Stderr = s.log, s.log
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting vsftpd: %v", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
	})
	testwait.For(t, "vsftpd to listen on "+s.Addr, func() bool {
		select {
		case <-done:
			t.Fatalf("vsftpd exited: %s", s.Log())
		default:
		}
		c, err := net.DialTimeout("tcp", s.Addr, time.Second)
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
	return s
}
