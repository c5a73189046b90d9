#if canImport(Glibc)
import Glibc
#endif
import Crypto
import Foundation
import ImageIO
import ProvisionCShims

/// The station's decompressed-image cache (issue 7): a compressed image is decompressed once,
/// into a sparse file on the station's disk, and every card that needs it reads that file at
/// its own speed. A card that arrives mid-batch joins the same file.
///
/// Why a file and not a shared ring in memory: with a ring, the slowest card holds every
/// other card back (Etcher's behaviour) or memory grows with the spread between cards. A
/// file costs one write of the mapped data to the station's disk — far faster than any SD
/// card — and keeps memory flat whatever the number of cards and the image size.
///
/// An image named by URL is downloaded once per version the server names (ETag,
/// Last-Modified) into this directory and then treated like a file; every card asks the
/// server (HEAD) whether the version changed, so a rebuilt image is picked up at the next card.
///
/// Entries are keyed by the SHA-256 of the image file's identity (device, inode, size,
/// modification time) and of its bmap, so a rebuilt image never reuses a stale cache. The
/// total size (allocated blocks) is kept under `limit` by dropping the least recently used
/// entries that no job is reading; the directory is emptied when the daemon starts.
public final class ImageCacheStore: @unchecked Sendable {
    public let directory: String
    public let limit: UInt64
    private let lock = NSLock()
    /// The entries new jobs may join, by key.
    private var entries: [String: Entry] = [:]
    /// Entries whose fill failed and that a new entry of the same key replaced, by `Entry.id`,
    /// until their last job lets go (a job releases its own entry, never the replacement).
    private var replaced: [String: Entry] = [:]
    private var serial = 0
    /// Images downloaded from URLs, by URL and version (see ImageCacheStore+Downloads.swift).
    let downloads = DownloadTable()

    final class Entry: @unchecked Sendable {
        let key: String
        /// The key and a serial: what a job's handle names, and the cache file's name.
        let id: String
        let path: String
        let fill = CacheFill()
        let size: UInt64
        let originalFormat: ImageFormat
        var users = 0
        var lastUsed = Date()
        init(key: String, id: String, path: String, size: UInt64, originalFormat: ImageFormat) {
            self.key = key; self.id = id; self.path = path; self.size = size; self.originalFormat = originalFormat
        }
    }

    public init(directory: String, limit: UInt64) throws {
        self.directory = directory
        self.limit = limit
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        // Files from an earlier run may be half-filled: nothing records how far they got.
        for name in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] where name.hasSuffix(".img") || name.hasSuffix(".download") || name.hasSuffix(".bmap") {
            try? FileManager.default.removeItem(atPath: (directory as NSString).appendingPathComponent(name))
        }
    }

    /// A raw source for `imagePath`: the image itself when it is raw, else its cache file,
    /// started (one decompressor thread) by the first job that asks and shared by the rest.
    /// Call `release` with the same path when the job no longer reads it.
    public func source(for imagePath: String, bmap: Bmap?) throws(ImageIOError) -> (source: ImageSource, cacheKey: String?, note: String) {
        // A card joining a decompression under way (or done) needs only the cache: the image
        // was identified when the entry was made, and the key (its device, inode, size and
        // mtime) says it has not changed since. Identifying it again read its first MiB from
        // disk and decoded it for each of 32 cards arriving together (issue 18).
        let key = Self.key(imagePath: imagePath, bmap: bmap)
        if let joined = lock.withLock({ join(key) }) { return try open(joined, key: key, note: sharingNote(joined, key: key)) }
        let original = try ImageSource(path: imagePath)
        guard original.format != .raw, let size = bmap?.imageSize ?? original.uncompressedSizeHint else {
            // Raw: the page cache shares it. Size unknown: this card decodes on its own.
            return (original, nil, original.format == .raw ? "raw image" : "decompressing \(original.format.rawValue) for this card alone (size unknown)")
        }
        let (entry, start) = lock.withLock { () -> (Entry, Bool) in
            // Another job may have made it since the look above.
            if let e = join(key) { return (e, false) }
            if let failed = entries[key] { retire(failed) }
            serial += 1
            let id = "\(key)-\(serial)"
            let e = Entry(key: key, id: id, path: (directory as NSString).appendingPathComponent(id + ".img"), size: size, originalFormat: original.format)
            e.users = 1
            entries[key] = e
            // Created under the lock: a job joining right after must find the file.
            _ = FileManager.default.createFile(atPath: e.path, contents: nil, attributes: [.posixPermissions: 0o600])
            return (e, true)
        }
        guard start else { return try open(entry, key: key, note: sharingNote(entry, key: key)) }
        // Decided before the fill starts, so this job's note can say how it decodes.
        let plan = CacheFiller.plan(source: original, bmap: bmap, size: size)
        evict(keeping: key, incoming: bmap?.mappedBytes ?? size)
        // Only as far ahead of the cards as they need: cards being probed leave the CPUs to
        // the probes (issue 18). Paced until no job reads the entry any more (`release`).
        entry.fill.pace(lead: plan.lead, startLead: plan.startLead)
        let thread = Thread {
            provision_name_thread("prov-decompress")
            CacheFiller.fill(source: original, bmap: bmap, size: size, into: entry.path, progress: entry.fill, plan: plan)
        }
        thread.start()
        let threads = plan.decoderThreads == 1 ? "" : plan.addsThreadsOnDemand ? " on up to \(plan.decoderThreads) threads" : " on \(plan.decoderThreads) threads"
        return try open(entry, key: key, note: "decompressing \(original.format.rawValue) once for every card\(threads) (cache \(key.prefix(12)))")
    }

    /// The fill of the entry a job's handle (`cacheKey`) names (tests).
    func fill(ofEntry id: String) -> CacheFill? {
        lock.withLock { (entries.values.first { $0.id == id } ?? replaced[id])?.fill }
    }

    /// Under the lock: a failed entry that a new one replaces. Its file goes now if no job
    /// reads it, else when the last one lets go.
    private func retire(_ entry: Entry) {
        entries.removeValue(forKey: entry.key)
        if entry.users > 0 {
            replaced[entry.id] = entry
        } else {
            try? FileManager.default.removeItem(atPath: entry.path)
        }
    }

    /// Under the lock: the entry for `key` when one is filling or filled, counted as one more
    /// user.
    private func join(_ key: String) -> Entry? {
        guard let e = entries[key], e.fill.error == nil else { return nil }
        e.users += 1
        e.lastUsed = Date()
        return e
    }

    private func sharingNote(_ entry: Entry, key: String) -> String {
        "sharing the \(entry.originalFormat.rawValue) decompression already under way (cache \(key.prefix(12)))"
    }

    /// The cache file of `entry` as a source for one job (its use given back if it cannot open).
    private func open(_ entry: Entry, key: String, note: String) throws(ImageIOError) -> (source: ImageSource, cacheKey: String?, note: String) {
        do {
            return (try ImageSource(cachePath: entry.path, filling: entry.fill, originalFormat: entry.originalFormat, size: entry.size), entry.id, note)
        } catch {
            release(entry.id)
            throw error
        }
    }

    /// The job no longer reads the entry `id` (the `cacheKey` that `source(for:bmap:)` gave).
    public func release(_ id: String?) {
        guard let id else { return }
        lock.withLock {
            if let e = replaced[id] {
                e.users -= 1
                if e.users == 0 {
                    e.fill.stopPacing()
                    replaced.removeValue(forKey: id)
                    try? FileManager.default.removeItem(atPath: e.path)
                }
                return
            }
            guard let e = entries.values.first(where: { $0.id == id }) else { return }
            e.users -= 1
            e.lastUsed = Date()
            // No card left to pace it by: it finishes for the next card (or it would wait forever).
            if e.users == 0 { e.fill.stopPacing() }
            // A failed fill is of no use to anyone.
            if e.users == 0, e.fill.error != nil {
                entries.removeValue(forKey: e.key)
                try? FileManager.default.removeItem(atPath: e.path)
            }
        }
    }

    /// Bytes the cache files take on disk (sparse: allocated blocks only).
    public var diskUsage: UInt64 {
        lock.withLock { (Array(entries.values) + Array(replaced.values)).reduce(0) { $0 + Self.allocated($1.path) } }
    }

    public var entryCount: Int { lock.withLock { entries.count } }

    private func evict(keeping key: String, incoming: UInt64) {
        lock.withLock {
            var total = entries.values.filter { $0.key != key }.reduce(UInt64(0)) { $0 + Self.allocated($1.path) } + incoming
            for e in entries.values.sorted(by: { $0.lastUsed < $1.lastUsed }) where total > limit && e.users == 0 && e.key != key {
                total -= min(total, Self.allocated(e.path))
                entries.removeValue(forKey: e.key)
                try? FileManager.default.removeItem(atPath: e.path)
            }
        }
    }

    static func allocated(_ path: String) -> UInt64 {
        var st = stat()
        return stat(path, &st) == 0 ? UInt64(st.st_blocks) * 512 : 0
    }

    static func key(imagePath: String, bmap: Bmap?) -> String {
        var st = stat()
        _ = stat(imagePath, &st)
        var identity = "\(imagePath)\u{0}\(st.st_dev)\u{0}\(st.st_ino)\u{0}\(st.st_size)\u{0}\(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec)"
        if let bmap { identity += "\u{0}\(bmap.path)\u{0}\(bmap.imageSize)\u{0}\(bmap.mappedBlocksCount)" }
        return SHA256.hash(data: Data(identity.utf8)).map { String(format: "%02x", $0) }.joined()
    }
}
