import Crypto
import Foundation
import ImageHTTP
import ImageIO

/// The station's downloads (issue 17): one local copy per URL and version, shared by every
/// card of a batch.
///
/// Why a whole download and not a stream per card: cards of a batch arrive minutes apart,
/// and each would download the image again; the copy costs one write of the compressed image
/// to the station's disk. (`provision write URL` streams instead: one card, no copy.)
final class DownloadTable: @unchecked Sendable {
    final class Entry: @unchecked Sendable {
        let url: String
        let path: String
        let condition = NSCondition()
        var finished = false
        var failure: ImageIOError?
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
        init(url: String, path: String) { self.url = url; self.path = path }
    }

    let lock = NSLock()
    var entries: [String: Entry] = [:]
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
    /// The local copy of the image at `url` as the server has it now: downloaded by the first
    /// job that asks for this version; jobs that ask meanwhile wait for that download.
    /// `findBmap`: also fetch the bmap next to it on the server.
    /// `progress`: bytes received and announced, while this job downloads or waits for
    /// another job's download of the same version.
    public func localImage(url: String, findBmap: Bool, options: HTTPOptions = HTTPOptions(),
                           progress: @escaping @Sendable (UInt64, UInt64?) -> Void = { _, _ in }) throws(ImageIOError) -> LocalImage {
        let now = try HTTPImage.validators(url: url, options: options)
        guard now.etag != nil || now.lastModified != nil else {
            throw ImageIOError(.imageUnreadable, "the server of \(url) names no version of the image (no ETag or Last-Modified): the station cannot tell a rebuilt image from the one it holds, so it does not cache it. Serve it from a server that sends either")
        }
        let identity = [url, now.etag ?? "", now.lastModified ?? "", now.contentLength.map(String.init) ?? ""].joined(separator: "\u{0}")
        let key = SHA256.hash(data: Data(identity.utf8)).map { String(format: "%02x", $0) }.joined()
        let table = downloads
        let (entry, start) = table.lock.withLock { () -> (DownloadTable.Entry, Bool) in
            if let e = table.entries[key], e.condition.withLock({ e.failure == nil }) {
                e.users += 1
                return (e, false)
            }
            let e = DownloadTable.Entry(url: url, path: (directory as NSString).appendingPathComponent(key + ".download"))
            e.users = 1
            table.entries[key] = e
            return (e, true)
        }
        if start {
            var failure: ImageIOError?
            do {
                let got = try HTTPImage.download(url: url, to: entry.path, options: options) { received, total in
                    entry.condition.withLock {
                        entry.received = received
                        entry.total = total
                        let now = ContinuousClock.now
                        if entry.lastWake.map({ now - $0 >= DownloadTable.Entry.wakeInterval }) ?? true {
                            entry.lastWake = now
                            entry.condition.broadcast()
                        }
                    }
                    progress(received, total)
                }
                if got != now {
                    throw ImageIOError(.imageUnreadable, "the image at \(url) changed on the server while it was downloaded; write the card again")
                }
                if findBmap, let bmap = try HTTPImage.locateBmap(forImage: url, options: options) {
                    let path = (directory as NSString).appendingPathComponent(key + ".bmap")
                    entry.bmapPath = try Self.save(bmap: bmap, url: url, to: path, options: options)
                    entry.imageSize = bmap.imageSize
                }
                if entry.imageSize == nil { entry.imageSize = (try? ImageSource(path: entry.path))?.uncompressedSizeHint }
            } catch let e as ImageIOError {
                failure = e
            } catch {
                failure = ImageIOError(.ioError, "\(error)")
            }
            entry.condition.withLock {
                entry.finished = true
                entry.failure = failure
                entry.condition.broadcast()
            }
            if failure == nil {
                table.lock.withLock { table.completed += 1 }
                dropOtherVersions(of: url, keeping: key)
            }
        }
        // Another job's download: its progress is this job's too, reported outside the lock
        // (the downloading thread takes it for every chunk).
        var seen = UInt64.max
        var result: ImageIOError?
        while true {
            let (finished, received, total, failure) = entry.condition.withLock {
                while !entry.finished && (start || entry.received == seen) { entry.condition.wait() }
                return (entry.finished, entry.received, entry.total, entry.failure)
            }
            if finished { result = failure; break }
            seen = received
            progress(received, total)
        }
        if let result {
            releaseDownload(key)
            throw result
        }
        return LocalImage(path: entry.path, bmapPath: entry.bmapPath, key: key,
                          note: start ? "downloaded \(url)" : "using the download of \(url) already made (same version)")
    }

    /// The job no longer reads the download `key`.
    public func releaseDownload(_ key: String?) {
        guard let key else { return }
        let table = downloads
        table.lock.withLock {
            guard let e = table.entries[key] else { return }
            e.users -= 1
            if e.users == 0, e.condition.withLock({ e.failure != nil }) {
                table.entries.removeValue(forKey: key)
                try? FileManager.default.removeItem(atPath: e.path)
            }
        }
        dropUnusedStaleVersions()
    }

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
