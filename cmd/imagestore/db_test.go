package main

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"imagestore/agent/api"
	"imagestore/blobstore"
	"imagestore/transfer/oci"
)

// mariadb is a throwaway server on a unix socket (no TCP port), root
// authenticated by the socket with an empty password.
type mariadb struct {
	sock string
}

func startMariaDB(t *testing.T) *mariadb {
	t.Helper()
	for _, b := range []string{"mariadb-install-db", "mariadbd", "mysqldump", "mysql"} {
		if _, err := exec.LookPath(b); err != nil {
			t.Fatalf("%s not installed: %v", b, err)
		}
	}
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	out, err := exec.Command("mariadb-install-db", "--no-defaults", "--datadir="+data,
		"--auth-root-authentication-method=normal", "--user=root", "--skip-test-db").CombinedOutput()
	if err != nil {
		t.Fatalf("mariadb-install-db: %v\n%s", err, out)
	}
	m := &mariadb{sock: filepath.Join(dir, "m.sock")}
	errLog := filepath.Join(dir, "err.log")
	cmd := exec.Command("mariadbd", "--no-defaults", "--datadir="+data, "--socket="+m.sock, "--skip-networking",
		"--user=root", "--pid-file="+filepath.Join(dir, "m.pid"), "--log-error="+errLog,
		"--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
		if t.Failed() {
			b, _ := os.ReadFile(errLog)
			t.Logf("mariadbd log:\n%s", b)
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err := m.query("SELECT 1"); err == nil {
			return m
		}
		select {
		case <-done:
			b, _ := os.ReadFile(errLog)
			t.Fatalf("mariadbd exited:\n%s", b)
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("mariadbd did not accept connections")
		}
	}
}

func (m *mariadb) query(sql string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "mysql", "--no-defaults", "--socket="+m.sock, "-uroot", "--batch", "--skip-column-names", "-e", sql).CombinedOutput()
	return string(out), err
}

func (m *mariadb) mustQuery(t *testing.T, sql string) string {
	t.Helper()
	out, err := m.query(sql)
	if err != nil {
		t.Fatalf("mysql %q: %v\n%s", sql, err, out)
	}
	return out
}

// TestDBBackupRestore backs up a real MariaDB database through the agent
// (the store on local disk, and on S3), restores it and compares
// checksums, then tries a corrupt backup and a failing mysqldump. One
// function because the later cases reuse the server and the backup the
// first one made.
func TestDBBackupRestore(t *testing.T) {
	for _, kind := range storageKinds {
		t.Run(kind, func(t *testing.T) { testDBBackupRestore(t, kind) })
	}
}

func testDBBackupRestore(t *testing.T, kind string) {
	s := startStoreOn(t, "tok", kind)
	m := startMariaDB(t)
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp) // to see that the defaults file is removed
	const pw = `p"w\ $x'`
	m.mustQuery(t, `
CREATE DATABASE shop;
CREATE TABLE shop.items (id INT PRIMARY KEY, name VARCHAR(64), price DECIMAL(10,2), img BLOB) ENGINE=InnoDB;
CREATE TABLE shop.orders (id INT AUTO_INCREMENT PRIMARY KEY, item INT, qty INT, note TEXT) ENGINE=InnoDB;
INSERT INTO shop.items VALUES (1,'apple',1.25,x'00ff10'),(2,'pear',2.50,NULL),(3,'plum ''quoted''',0.99,x'deadbeef');
INSERT INTO shop.orders (item,qty,note) VALUES (1,3,'first'),(2,1,'ünïcode'),(3,7,REPEAT('x',5000));
CREATE PROCEDURE shop.total() SELECT SUM(qty) FROM shop.orders;
CREATE USER 'bk'@'localhost' IDENTIFIED BY '`+strings.ReplaceAll(strings.ReplaceAll(pw, `\`, `\\`), `'`, `\'`)+`';
GRANT ALL ON *.* TO 'bk'@'localhost';`)
	checksum := func() string {
		return m.mustQuery(t, "CHECKSUM TABLE shop.items, shop.orders EXTENDED")
	}
	before := checksum()
	pwFile := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(pwFile, []byte(pw+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	g := []string{"-url", s.url, "-token", "tok", "-quiet"}
	conn := []string{"--mysql-socket", m.sock, "--mysql-user", "bk", "--mysql-password-file", pwFile}

	var res dbBackupResult
	out, errs, code := cli(t, append(append(append([]string{}, g...), "db", "backup", "-json", "--databases", "shop", "--description", "nightly"), conn...)...)
	if code != 0 {
		t.Fatalf("db backup: exit %d: %s %s", code, out, errs)
	}
	if strings.Contains(out+errs, pw) {
		t.Fatal("password printed")
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatal(err)
	}
	if res.Name != "zsbak" || len(res.MD5) != 32 || res.Size <= 0 || res.VirtualSize <= res.Size {
		t.Fatalf("backup result: %+v", res)
	}
	if left, _ := filepath.Glob(filepath.Join(tmp, "imagestore-my-*")); len(left) != 0 {
		t.Fatalf("defaults file left behind: %v", left)
	}

	// The record: format gzip, desc JSON with the md5; images lists it (seed 002 shape).
	var imgs api.ListImagesReply
	cliJSON(t, &imgs, append(append([]string{}, g...), "images", "-json", "-name", "zsbak")...)
	if len(imgs.Infos) != 1 || imgs.Infos[0].ID != res.ID || imgs.Infos[0].Format != "gzip" || imgs.Infos[0].Blobsum != res.Blobsum {
		t.Fatalf("images: %+v", imgs)
	}
	var dd dbDesc
	if err := json.Unmarshal([]byte(imgs.Infos[0].Desc), &dd); err != nil {
		t.Fatal(err)
	}
	if dd.Type != "mysql" || dd.MD5 != res.MD5 || dd.Name != "shop" || dd.Description != "nightly" || dd.CreatedTime == 0 || dd.Version == "" {
		t.Fatalf("desc: %+v", dd)
	}

	m.mustQuery(t, "DROP DATABASE shop")
	if _, err := m.query("SELECT COUNT(*) FROM shop.items"); err == nil {
		t.Fatal("database still there")
	}
	cliOK(t, append(append(append([]string{}, g...), "db", "restore", "zsbak:"+res.ID), conn...)...)
	if after := checksum(); after != before {
		t.Fatalf("checksums differ:\nbefore %s\nafter  %s", before, after)
	}
	if out := m.mustQuery(t, "SHOW PROCEDURE STATUS WHERE Db='shop'"); !strings.Contains(out, "total") {
		t.Fatalf("procedure not restored: %s", out)
	}

	// A backup whose recorded md5 does not match its bytes is refused
	// before anything reaches mysql.
	c, err := oci.New(oci.Options{Addr: s.url, Token: "tok"})
	if err != nil {
		t.Fatal(err)
	}
	ri, err := fetchImage(t.Context(), c, blobstore.Ref{Name: "zsbak", ID: res.ID})
	if err != nil {
		t.Fatal(err)
	}
	bad := ri.Top()
	bad.ID = "corrupt"
	dd.MD5 = strings.Repeat("0", 32)
	b, _ := json.Marshal(dd)
	bad.Desc = string(b)
	if err := putImage(t.Context(), c, []blobstore.Image{bad}); err != nil {
		t.Fatal(err)
	}
	m.mustQuery(t, "DROP DATABASE shop")
	_, errs, code = cli(t, append(append(append([]string{}, g...), "db", "restore", "zsbak:corrupt"), conn...)...)
	if code != 1 || !strings.Contains(errs, "corrupt") {
		t.Fatalf("restore of a corrupt backup: exit %d: %s", code, errs)
	}
	if _, err := m.query("SELECT COUNT(*) FROM shop.items"); err == nil {
		t.Fatal("a corrupt backup was restored")
	}

	// mysqldump failing (no such database) commits nothing.
	_, errs, code = cli(t, append(append(append([]string{}, g...), "db", "backup", "--databases", "nosuchdb"), conn...)...)
	if code != 1 || !strings.Contains(errs, "mysqldump") {
		t.Fatalf("backup of a missing database: exit %d: %s", code, errs)
	}
	cliJSON(t, &imgs, append(append([]string{}, g...), "images", "-json", "-name", "zsbak")...)
	if len(imgs.Infos) != 2 {
		t.Fatalf("failed backup recorded an image: %+v", imgs)
	}
}
