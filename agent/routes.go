package agent

import "net/http"

// routeTable is every /imagestore/* path the agent serves, in one place.
// Each Async route also answers as its "-sync" twin (see buildRoutes).
func routeTable() []Route {
	return []Route{
		// Store and agent.
		{Path: "/imagestore/echo/", Mode: Sync, Handler: (*Agent).echo, Methods: []string{http.MethodGet, http.MethodPost, http.MethodPut, http.MethodHead}},
		{Path: "/imagestore/connect/", Mode: Sync, Handler: (*Agent).connect},
		{Path: "/imagestore/ping/", Mode: Async, Handler: (*Agent).ping},
		{Path: "/imagestore/setquota/", Mode: Async, Handler: (*Agent).setQuota},
		{Path: "/imagestore/debug/sleep/", Mode: Async, Handler: (*Agent).debugSleep},

		// Jobs.
		{Path: "/imagestore/progress/", Mode: Sync, Handler: (*Agent).progress},
		{Path: "/imagestore/job/list/", Mode: Sync, Handler: (*Agent).jobList},
		{Path: "/imagestore/job/get/", Mode: Sync, Handler: (*Agent).jobGet},
		{Path: "/imagestore/job/cancel/", Mode: Sync, Handler: (*Agent).jobCancel},

		// Upload dirs and install paths handed to KVM hosts.
		{Path: "/imagestore/allocuploaddir/", Mode: Sync, Handler: (*Agent).allocUploadDir},
		{Path: "/imagestore/installpath/allocate", Mode: Sync, Handler: (*Agent).allocInstallPath},
		{Path: "/imagestore/upload/", Mode: Sync, Handler: (*Agent).uploadChunk, Methods: []string{http.MethodPut, http.MethodPost}},

		// Images: import, inspect, delete, collect.
		{Path: "/imagestore/import-backup/", Mode: Async, Handler: (*Agent).importBackup},
		{Path: "/imagestore/import/", Mode: Async, Handler: (*Agent).importURL},
		{Path: "/imagestore/imgchain/", Mode: Async, Handler: (*Agent).imgChain},
		{Path: "/imagestore/imginfo/", Mode: Async, Handler: (*Agent).imgInfo},
		{Path: "/imagestore/images/", Mode: Sync, Handler: (*Agent).listImages},
		{Path: "/imagestore/delete/", Mode: Async, Handler: (*Agent).deleteImage},
		{Path: "/imagestore/gc/", Mode: Async, Handler: (*Agent).gc},
		{Path: "/imagestore/getimagehash/", Mode: Async, Handler: (*Agent).imageHash},
		{Path: "/imagestore/template/create/", Mode: Async, Handler: (*Agent).createTemplate},

		// Download exports.
		{Path: "/imagestore/export/", Mode: Async, Handler: (*Agent).export},
		{Path: "/imagestore/delexp/", Mode: Async, Handler: (*Agent).delExport},

		// NBD targets and read-only chains.
		{Path: "/imagestore/exportnbdimage/", Mode: Async, Handler: (*Agent).exportNBDImage},
		{Path: "/imagestore/exportnbdimage/cancel/", Mode: Async, Handler: (*Agent).cancelNBDImage},
		{Path: "/imagestore/export/remotetarget/", Mode: Async, Handler: (*Agent).exportRemoteTarget},
		{Path: "/imagestore/remotetarget/delete/", Mode: Async, Handler: (*Agent).deleteRemoteTarget},

		// Transfers with KVM hosts over SSH.
		{Path: "/imagestore/pullfromhost/", Mode: Async, Handler: (*Agent).pullFromHost},
		{Path: "/imagestore/writetohost/", Mode: Async, Handler: (*Agent).writeToHost},
	}
}
