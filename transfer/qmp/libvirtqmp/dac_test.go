package libvirtqmp

import "testing"

func TestDACLabel(t *testing.T) {
	for _, c := range []struct {
		xml      string
		uid, gid int
		ok       bool
	}{
		{`<domain><seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+111</label><imagelabel>+64055:+111</imagelabel></seclabel></domain>`, 64055, 111, true},
		{`<domain><seclabel type='none' model='apparmor'/><seclabel type='dynamic' model='dac' relabel='no'><label>+0:+0</label></seclabel></domain>`, 0, 0, true},
		{`<domain><seclabel type='dynamic' model='dac'><label>qemu:qemu</label></seclabel></domain>`, 0, 0, false},
		{`<domain/>`, 0, 0, false},
		{`<domain`, 0, 0, false},
	} {
		uid, gid, err := dacLabel(c.xml)
		if (err == nil) != c.ok || uid != c.uid || gid != c.gid {
			t.Errorf("dacLabel(%s) = %d:%d %v", c.xml, uid, gid, err)
		}
	}
}
