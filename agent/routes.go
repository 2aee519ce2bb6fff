package agent

import (
	"net/http"

	"imagestore/agent/api"
)

// routeTable is every /imagestore/* path the agent serves, in one place.
// Each Async route also answers as its "-sync" twin (see buildRoutes).
func routeTable() []Route {
	return []Route{
		// Store and agent.
		{Path: api.PathEcho, Mode: Sync, Handler: (*Agent).echo, Methods: []string{http.MethodGet, http.MethodPost, http.MethodPut, http.MethodHead}},
		{Path: api.PathConnect, Mode: Sync, Handler: (*Agent).connect},
		{Path: api.PathPing, Mode: Async, Handler: (*Agent).ping},
		{Path: api.PathSetQuota, Mode: Async, Handler: (*Agent).setQuota},
		{Path: api.PathDebugSleep, Mode: Async, Handler: (*Agent).debugSleep},

		// Jobs.
		{Path: api.PathProgress, Mode: Sync, Handler: (*Agent).progress},
		{Path: api.PathJobList, Mode: Sync, Handler: (*Agent).jobList},
		{Path: api.PathJobGet, Mode: Sync, Handler: (*Agent).jobGet},
		{Path: api.PathJobCancel, Mode: Sync, Handler: (*Agent).jobCancel},

		// Upload dirs and install paths handed to KVM hosts.
		{Path: api.PathAllocUploadDir, Mode: Sync, Handler: (*Agent).allocUploadDir},
		{Path: api.PathAllocInstallPath, Mode: Sync, Handler: (*Agent).allocInstallPath},
		{Path: api.PathUpload, Mode: Sync, Handler: (*Agent).uploadChunk, Methods: []string{http.MethodPut, http.MethodPost}},

		// Images: import, inspect, delete, collect.
		{Path: api.PathImportBackup, Mode: Async, Handler: (*Agent).importBackup},
		{Path: api.PathImport, Mode: Async, Handler: (*Agent).importURL},
		{Path: api.PathImgChain, Mode: Async, Handler: (*Agent).imgChain},
		{Path: api.PathImgInfo, Mode: Async, Handler: (*Agent).imgInfo},
		{Path: api.PathImages, Mode: Sync, Handler: (*Agent).listImages},
		{Path: api.PathDelete, Mode: Async, Handler: (*Agent).deleteImage},
		{Path: api.PathGC, Mode: Async, Handler: (*Agent).gc, BodyLimit: largeBodyLimit},
		{Path: api.PathGetImageHash, Mode: Async, Handler: (*Agent).imageHash},
		{Path: api.PathTemplateCreate, Mode: Async, Handler: (*Agent).createTemplate},

		// Download exports.
		{Path: api.PathExport, Mode: Async, Handler: (*Agent).export},
		{Path: api.PathDelExport, Mode: Async, Handler: (*Agent).delExport},
		{Path: api.PathPackExportedImages, Mode: Async, Handler: (*Agent).packExportedImages},
		{Path: api.PathDeleteImagePackage, Mode: Async, Handler: (*Agent).deleteImagePackage},
		{Path: api.PathRemoteUpload, Mode: Async, Handler: (*Agent).remoteUpload},

		// NBD targets and read-only chains.
		{Path: api.PathExportNBDImage, Mode: Async, Handler: (*Agent).exportNBDImage},
		{Path: api.PathExportNBDImageCancel, Mode: Async, Handler: (*Agent).cancelNBDImage},
		{Path: api.PathExportRemoteTarget, Mode: Async, Handler: (*Agent).exportRemoteTarget},
		{Path: api.PathRemoteTargetDelete, Mode: Async, Handler: (*Agent).deleteRemoteTarget},

		// Transfers with KVM hosts over SSH.
		{Path: api.PathPullFromHost, Mode: Async, Handler: (*Agent).pullFromHost},
		{Path: api.PathWriteToHost, Mode: Async, Handler: (*Agent).writeToHost},

		// Cancelling the management node's jobs.
		{Path: api.PathImportCancel, Mode: Async, Handler: (*Agent).importCancel},
		{Path: api.PathCancelJob, Mode: Sync, Handler: (*Agent).cancelJob},

		// Files on the store host.
		{Path: api.PathGetLocalFileSize, Mode: Async, Handler: (*Agent).getLocalFileSize},
		{Path: api.PathGetLocalCacheDir, Mode: Sync, Handler: (*Agent).getLocalCacheDir},

		// Image metadata for disaster recovery (dump carries every image's inventory).
		{Path: api.PathGenerateMetadataFile, Mode: Async, Handler: (*Agent).generateMetadataFile},
		{Path: api.PathCheckMetadataFile, Mode: Async, Handler: (*Agent).checkMetadataFile},
		{Path: api.PathDumpMetadata, Mode: Async, Handler: (*Agent).dumpMetadata, BodyLimit: largeBodyLimit},
		{Path: api.PathGetMetadata, Mode: Async, Handler: (*Agent).getMetadata},
		{Path: api.PathDeleteMetadata, Mode: Async, Handler: (*Agent).deleteMetadata},

		// Not supported: a clear success:false, never a 404.
		{Path: api.PathArchiveData, Mode: Async, Handler: notSupported(api.PathArchiveData)},
		{Path: api.PathUnpackData, Mode: Async, Handler: notSupported(api.PathUnpackData)},
		{Path: api.PathSyncData, Mode: Async, Handler: notSupported(api.PathSyncData)},
		{Path: api.PathFileDownload, Mode: Async, Handler: notSupported(api.PathFileDownload)},
		{Path: api.PathFileUpload, Mode: Async, Handler: notSupported(api.PathFileUpload)},
		{Path: api.PathFileProgress, Mode: Sync, Handler: notSupported(api.PathFileProgress)},
		{Path: api.PathFileCancel, Mode: Async, Handler: notSupported(api.PathFileCancel)},
		{Path: api.PathFileUnzip, Mode: Async, Handler: notSupported(api.PathFileUnzip)},
		{Path: api.PathFilesDelete, Mode: Async, Handler: notSupported(api.PathFilesDelete)},
		{Path: api.PathUpgradeDeploy, Mode: Async, Handler: notSupported(api.PathUpgradeDeploy)},
	}
}
