import Crypto
import Foundation
import ImageHTTP
import ImageIO
import ProvisionCShims

/// The station's downloads (issue 17): one local copy per URL and version, shared by every
/// card of a batch.
///
/// Why a whole download and not a stream per card: cards of a batch arrive minutes apart,
/// and each would download the image again; the copy costs one write of the compressed image
/// to the station's disk. (`provision write URL` streams instead: one card, no copy.)
final class DownloadTable: @unchecked Sendable {
    final class Entry: @unchecked Sendable {
        let url: String
        /// The URL and the version the server named: jobs asking for it share this entry.
        let version: String
        /// This entry's own name (the version and a serial), for `releaseDownload`: a failed
        /// download's jobs let go of their entry, never of the one made to try again.
        let id: String
        let path: String
        let condition = NSCondition()
        var finished = false
        var failure: ImageIOError?
        /// Every job that asked for it left before it finished: it is stopped, and its
        /// thread deletes what it had downloaded.
        var abandoned = false
        let stopper = DownloadStopper()
        var users = 0
        var bmapPath: String?
        /// A newer version of the URL is here: deleted once no job reads it.
        var stale = false
        /// What the image needs on a card, once downloaded: its bmap's ImageSize where a job
        /// had one, else the container's size.
        var imageSize: UInt64?
        /// Bytes received and announced, for the jobs that wait on this download.
        var received: UInt64 = 0
        var total: UInt64?
        /// When the waiting jobs were last woken for progress: at most every `wakeInterval`,
        /// not for every chunk the network delivers.
        var lastWake: ContinuousClock.Instant?
        static let wakeInterval = Duration.milliseconds(250)
        init(url: String, version: String, id: String, path: String) {
            self.url = url; self.version = version; self.id = id; self.path = path
        }
        /// Under `condition`: a job may still join it.
        var joinable: Bool { failure == nil && !abandoned }
    }

    let lock = NSLock()
    /// By `Entry.id`: the downloads jobs read or may join, and failed ones still read.
    var entries: [String: Entry] = [:]
    var serial = 0
    /// Whole downloads made so far (the tests count them).
    var completed = 0
}

/// A downloaded image: its local path, the bmap found next to it on the server, and the key
/// to `releaseDownload` when the job is done with it.
public struct LocalImage: Sendable {
    public let path: String
    public let bmapPath: String?
    public let key: String
    public let note: String
}

extension ImageCacheStore {
    /// The local copy of the image at `url` as the server has it now: downloaded (on a
    /// thread of its own) for the first job that asks for this version; jobs that ask
    /// meanwhile wait for the same download.
    /// `findBmap`: also fetch the bmap next to it on the server.
    /// `cancelled`: asked while the job waits; once true the job stops waiting, and a
    /// download no other job waits for is stopped and its file deleted.
    /// `progress`: bytes received and announced while the job waits.
    public func localImage(url: String, findBmap: Bool, options: HTTPOptions = HTTPOptions(),
                           cancelled: @escaping @Sendable () -> Bool = { false },
                           progress: @escaping @Sendable (UInt64, UInt64?) -> Void = { _, _ in }) throws(ImageIOError) -> LocalImage {
        let now = try HTTPImage.validators(url: url, options: options)
        guard now.etag != nil || now.lastModified != nil else {
            throw ImageIOError(.imageUnreadable, "the server of \(url) names no version of the image (no ETag or Last-Modified): the station cannot tell a rebuilt image from the one it holds, so it does not cache it. Serve it from a server that sends either")
        }
        let identity = [url, now.etag ?? "", now.lastModified ?? "", now.contentLength.map(String.init) ?? ""].joined(separator: "\u{0}")
        let version = SHA256.hash(data: Data(identity.utf8)).map { String(format: "%02x", $0) }.joined()
        let table = downloads
        let (entry, start) = table.lock.withLock { () -> (DownloadTable.Entry, Bool) in
            if let e = table.entries.values.first(where: { e in e.version == version && e.condition.withLock { e.joinable } }) {
                e.users += 1
                return (e, false)
            }
            table.serial += 1
            let id = "\(version)-\(table.serial)"
            let e = DownloadTable.Entry(url: url, version: version, id: id,
                                        path: (directory as NSString).appendingPathComponent(id + ".download"))
            e.users = 1
            table.entries[id] = e
            return (e, true)
        }
        if start { startDownload(entry, expecting: now, findBmap: findBmap, options: options) }
        var seen = UInt64.max
        while true {
            let (finished, received, total, failure) = entry.condition.withLock {
                // Timed: a cancel is noticed though the download sends nothing meanwhile.
                while !entry.finished && entry.received == seen && !cancelled() {
                    _ = entry.condition.wait(until: Date(timeIntervalSinceNow: 0.1))
                }
                return (entry.finished, entry.received, entry.total, entry.failure)
            }
            if received != seen {
                seen = received
                if failure == nil, received > 0 || total != nil { progress(received, total) }
            }
            if finished {
                if let failure {
                    releaseDownload(entry.id)
                    throw failure
                }
                break
            }
            if cancelled() {
                releaseDownload(entry.id)
                throw ImageIOError(.cancelled, "cancelled while the image was downloaded from \(url); nothing was written")
            }
        }
        return LocalImage(path: entry.path, bmapPath: entry.bmapPath, key: entry.id,
                          note: start ? "downloaded \(url)" : "using the download of \(url) already made (same version)")
    }

    /// Downloads `entry` on a thread of its own: no job's cancel stops a download that
    /// other jobs wait for, and the last job to leave stops it.
    private func startDownload(_ entry: DownloadTable.Entry, expecting version: HTTPValidators, findBmap: Bool, options: HTTPOptions) {
        let table = downloads
        let thread = Thread { [self] in
            provision_name_thread("prov-download")
            var failure: ImageIOError?
            do {
                let url = entry.url
                let got = try HTTPImage.download(url: url, to: entry.path, options: options, stopper: entry.stopper) { received, total in
                    entry.condition.withLock {
                        entry.received = received
                        entry.total = total
                        let now = ContinuousClock.now
                        if entry.lastWake.map({ now - $0 >= DownloadTable.Entry.wakeInterval }) ?? true {
                            entry.lastWake = now
                            entry.condition.broadcast()
                        }
                    }
                }
                if got != version {
                    throw ImageIOError(.imageUnreadable, "the image at \(url) changed on the server while it was downloaded; write the card again")
                }
                if findBmap, let bmap = try HTTPImage.locateBmap(forImage: url, options: options) {
                    let path = (directory as NSString).appendingPathComponent(entry.id + ".bmap")
                    entry.bmapPath = try Self.save(bmap: bmap, url: url, to: path, options: options)
                    entry.imageSize = bmap.imageSize
                }
                if entry.imageSize == nil { entry.imageSize = (try? ImageSource(path: entry.path))?.uncompressedSizeHint }
            } catch let e as ImageIOError {
                failure = e
            } catch {
                failure = ImageIOError(.ioError, "\(error)")
            }
            if failure == nil {
                // Before the waiting jobs hear of it: the older versions are stale by then.
                table.lock.withLock { table.completed += 1 }
                dropOtherVersions(of: entry.url, keeping: entry.id)
            }
            let abandoned = entry.condition.withLock { () -> Bool in
                entry.finished = true
                entry.failure = failure
                entry.condition.broadcast()
                return entry.abandoned
            }
            if abandoned {
                // Out of the table already: nobody else can reach these files.
                try? FileManager.default.removeItem(atPath: entry.path)
                if let b = entry.bmapPath { try? FileManager.default.removeItem(atPath: b) }
            }
        }
        thread.start()
    }

    /// The job no longer reads the download `key` (a `LocalImage.key`).
    public func releaseDownload(_ key: String?) {
        guard let key else { return }
        let table = downloads
        let stop: DownloadStopper? = table.lock.withLock {
            guard let e = table.entries[key] else { return nil }
            e.users -= 1
            guard e.users == 0 else { return nil }
            return e.condition.withLock { () -> DownloadStopper? in
                if !e.finished {
                    // Nobody waits for it any more: stopped, and its thread deletes the file.
                    e.abandoned = true
                    table.entries.removeValue(forKey: key)
                    return e.stopper
                }
                if e.failure != nil {
                    table.entries.removeValue(forKey: key)
                    try? FileManager.default.removeItem(atPath: e.path)
                }
                return nil
            }
        }
        stop?.stop()
        dropUnusedStaleVersions()
    }

    /// Downloads under way or kept (the tests look).
    var downloadEntryCount: Int { downloads.lock.withLock { downloads.entries.count } }

    /// What the newest complete download of `url` needs on a card (its bmap's ImageSize, or
    /// the container's size); nil before one is here. Reads no network: asked when a card
    /// is judged.
    public func knownImageSize(url: String) -> UInt64? {
        let table = downloads
        return table.lock.withLock {
            table.entries.values.filter { $0.url == url && !$0.stale }
                .compactMap { e in e.condition.withLock { e.finished && e.failure == nil ? e.imageSize : nil } }.max()
        }
    }

    /// A job learnt the image's size from its bmap (one named by the profile).
    func noteImageSize(_ size: UInt64, download key: String) {
        let table = downloads
        table.lock.withLock {
            guard let e = table.entries[key] else { return }
            e.condition.withLock { e.imageSize = size }
        }
    }

    /// Whole downloads made since the station started.
    public var downloadsCompleted: Int { downloads.lock.withLock { downloads.completed } }

    /// Older versions of `url` are of no use once a newer one is here; those still read by a
    /// job go when it releases them.
    private func dropOtherVersions(of url: String, keeping key: String) {
        let table = downloads
        table.lock.withLock {
            for (k, e) in table.entries where e.url == url && k != key { e.stale = true }
        }
        dropUnusedStaleVersions()
    }

    private func dropUnusedStaleVersions() {
        let table = downloads
        table.lock.withLock {
            for (k, e) in table.entries where e.stale && e.users == 0 {
                table.entries.removeValue(forKey: k)
                try? FileManager.default.removeItem(atPath: e.path)
                if let b = e.bmapPath { try? FileManager.default.removeItem(atPath: b) }
            }
        }
    }

    private static func save(bmap: Bmap, url: String, to path: String, options: HTTPOptions) throws(ImageIOError) -> String {
        _ = try HTTPImage.download(url: bmap.path, to: path, options: options)
        return path
    }
}
