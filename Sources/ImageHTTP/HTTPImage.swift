import AsyncHTTPClient
import Foundation
import ImageIO
import NIOCore
import NIOHTTP1

/// Images on a build server (issue 17): `provision write https://…/disk.img.xz /dev/sdX`
/// streams the body through the write engine, with no temporary copy; the station downloads
/// once into its cache (`ImageCacheStore`) and shares the file among cards.
public enum HTTPImage {
    /// Whether `location` names an image over HTTP(S) rather than a file.
    public static func isURL(_ location: String) -> Bool {
        location.hasPrefix("http://") || location.hasPrefix("https://")
    }

    /// Opens `url` as an image source: the body is read as it arrives; a dropped connection
    /// is resumed where the server allows ranges. Blocks until the response head and the
    /// first MiB have arrived (the format is told from them); call it from a thread of its
    /// own, not from Swift's cooperative pool.
    public static func source(url: String, forceRaw: Bool = false, options: HTTPOptions = HTTPOptions()) throws(ImageIOError) -> (source: ImageSource, download: HTTPDownload) {
        let download = try HTTPDownload.start(url: url, options: options)
        let prefix = try download.peek(1 << 20)
        let source = try ImageSource(streamNamed: url, input: download, prefix: prefix, size: download.contentLength, forceRaw: forceRaw) { () throws(ImageIOError) in
            try HTTPImage.source(url: url, forceRaw: forceRaw, options: options).source
        }
        source.inputProgress = { [weak download] in (download?.bytesReceived ?? 0, download?.contentLength) }
        return (source, download)
    }

    /// What the server says about `url` now (a HEAD request): how a cache tells a changed
    /// image from the one it holds.
    public static func validators(url: String, options: HTTPOptions = HTTPOptions()) throws(ImageIOError) -> HTTPValidators {
        let head = try HTTPDownload.start(url: url, options: options, method: .HEAD)
        return head.validators
    }

    /// Downloads `url` into the file `path` (created or replaced), resuming dropped
    /// connections. Returns what the server said about the version it sent.
    public static func download(url: String, to path: String, options: HTTPOptions = HTTPOptions(),
                                stopper: DownloadStopper? = nil,
                                progress: (UInt64, UInt64?) -> Void = { _, _ in }) throws(ImageIOError) -> HTTPValidators {
        let download = try HTTPDownload.start(url: url, options: options)
        if let stopper {
            guard stopper.attach(download) else { throw ImageIOError(.cancelled, "the download of \(url) was stopped") }
        }
        defer { stopper?.detach() }
        guard let handle = FileHandle(forWritingAtPath: path) ?? {
            FileManager.default.createFile(atPath: path, contents: nil, attributes: [.posixPermissions: 0o600]) ? FileHandle(forWritingAtPath: path) : nil
        }() else {
            throw ImageIOError(.ioError, "cannot create \(path) for the download of \(url)")
        }
        defer { try? handle.close() }
        do {
            try handle.truncate(atOffset: 0)
            while true {
                let bytes = try download.available()
                if bytes.isEmpty { break }
                try handle.write(contentsOf: Data(bytesNoCopy: UnsafeMutableRawPointer(mutating: bytes.baseAddress!), count: bytes.count, deallocator: .none))
                download.consume(bytes.count)
                progress(download.bytesReceived, download.contentLength)
            }
        } catch let e as ImageIOError {
            throw e.code == .cancelled ? ImageIOError(.cancelled, "the download of \(url) was stopped") : e
        } catch {
            throw ImageIOError(.ioError, "cannot write the download of \(url) to \(path): \(error)")
        }
        return download.validators
    }
}

/// Stops a download (`HTTPImage.download`) from another thread: its wait for the network
/// ends at once, and a download not yet started never starts.
public final class DownloadStopper: @unchecked Sendable {
    private let lock = NSLock()
    private var stopped = false
    private var current: HTTPDownload?

    public init() {}

    public func stop() {
        let running = lock.withLock { () -> HTTPDownload? in
            stopped = true
            return current
        }
        running?.cancel()
    }

    /// False once stopped: the download is not to go on.
    func attach(_ download: HTTPDownload) -> Bool {
        lock.withLock {
            guard !stopped else { return false }
            current = download
            return true
        }
    }

    func detach() { lock.withLock { current = nil } }
}

extension HTTPImage {
    /// A small file (a bmap) in memory; nil when the server says 404.
    /// `absentToo`: HTTP statuses that also mean "not there" (besides 404 and 410).
    public static func fetch(url: String, limit: Int = 64 << 20, options: HTTPOptions = HTTPOptions(), absentToo: Set<Int> = []) throws(ImageIOError) -> [UInt8]? {
        let download: HTTPDownload
        do throws(ImageIOError) { download = try HTTPDownload.start(url: url, options: options) } catch where error.code == .imageMissing || error.httpStatus.map(absentToo.contains) == true {
            return nil
        }
        var bytes: [UInt8] = []
        while true {
            let chunk: UnsafeRawBufferPointer
            do { chunk = try download.available() } catch let e as ImageIOError { throw e } catch {
                throw ImageIOError(.imageUnreadable, "cannot download \(url): \(error)")
            }
            if chunk.isEmpty { return bytes }
            bytes += chunk
            download.consume(chunk.count)
            if bytes.count > limit { throw ImageIOError(.bmapInvalid, "\(url) is larger than \(limit) bytes: not a bmap") }
        }
    }

    /// The bmap next to an image on a server, found as bmaptool finds it next to a file:
    /// `URL.bmap`, then with each extension of the name stripped in turn. Returns its URL
    /// and the parsed bmap, or nil when the server has none.
    ///
    /// A guessed name answered with 401 or 403 is not there either: object stores answer 403
    /// for a key that does not exist when the caller may not list the bucket, and a presigned
    /// URL's signature covers the image's path only, so every other name is refused. Failing
    /// the card there would make such images unwritable; without a bmap the whole image is
    /// written and still read back (bmaptool goes on without one too). A bmap named outright
    /// (`loadBmap`) that is refused stays an error.
    public static func locateBmap(forImage url: String, options: HTTPOptions = HTTPOptions()) throws(ImageIOError) -> Bmap? {
        let query = url.firstIndex(of: "?").map { String(url[$0...]) } ?? ""
        var base = String(url.dropLast(query.count))
        while true {
            let candidate = base + ".bmap"
            if let bytes = try fetch(url: candidate + query, options: options, absentToo: [401, 403]) {
                return try Bmap.parse(Data(bytes), path: candidate)
            }
            // Strip one extension of the file name (never a dot in the host or a directory).
            let name = base.lastIndex(of: "/").map { base.index(after: $0) } ?? base.startIndex
            guard let dot = base[name...].lastIndex(of: "."), dot > name else { return nil }
            base = String(base[..<dot])
        }
    }

    /// A bmap named by URL (`--bmap https://…`, a profile's `bmap = "https://…"`).
    public static func loadBmap(url: String, options: HTTPOptions = HTTPOptions()) throws(ImageIOError) -> Bmap {
        guard let bytes = try fetch(url: url, options: options) else {
            throw ImageIOError(.bmapInvalid, "bmap not found: \(url) (the server says 404)")
        }
        return try Bmap.parse(Data(bytes), path: url)
    }
}

/// Knobs of a download; the tests shorten the timeouts.
public struct HTTPOptions: Sendable {
    /// A server that sends nothing for this long is a dropped connection (resumed if it can be).
    public var readTimeout: Duration = .seconds(30)
    public var connectTimeout: Duration = .seconds(10)
    /// Resumptions after dropped connections, in a row without progress between them.
    public var resumeAttempts = 5

    public init() {}
}

/// The version of a resource as the server names it: a changed image has a new ETag or
/// Last-Modified (or, from a server that gives neither, a new length).
public struct HTTPValidators: Sendable, Equatable, Hashable {
    public var etag: String?
    public var lastModified: String?
    public var contentLength: UInt64?

    /// Whether a resumed request can ask for "the rest of this same version" (If-Range).
    var identifiesVersion: Bool { etag != nil || lastModified != nil }
}
