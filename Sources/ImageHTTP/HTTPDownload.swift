import AsyncHTTPClient
import Dispatch
import Foundation
import ImageIO
import NIOCore
import NIOHTTP1

/// One HTTP(S) body, read by a blocking consumer (the write engine's reader thread) while a
/// task of its own receives it. The two meet in a bounded queue (8 MiB): a slow card slows
/// the download instead of filling memory.
///
/// A connection that drops (or stalls past the read timeout) is resumed with a range request
/// for the rest, where the server accepts ranges and names the version it sent (ETag or
/// Last-Modified, sent back as If-Range so a changed image is never spliced onto the old
/// one). Otherwise the download fails, and so does the write: a card is never reported done
/// from half a body.
public final class HTTPDownload: CompressedInput, @unchecked Sendable {
    public let url: String
    public let validators: HTTPValidators
    public var contentLength: UInt64? { validators.contentLength }
    /// Bytes of the body received so far (the download's progress).
    public var bytesReceived: UInt64 { queue.received }
    /// How many times a dropped connection was resumed.
    public var resumptions: Int { queue.resumptions }

    private let queue: BodyQueue
    private let task: Task<Void, Never>
    /// The consumer's side: the buffer being read and the ones peeked at before it.
    private var pending: [ByteBuffer] = []

    private init(url: String, validators: HTTPValidators, queue: BodyQueue, task: Task<Void, Never>) {
        self.url = url
        self.validators = validators
        self.queue = queue
        self.task = task
    }

    deinit {
        // A write that stopped early (an error, a cancel) stops the download with it.
        cancel()
    }

    /// Stops the download from any thread: a reader waiting for the network gets a
    /// `cancelled` error at once instead of waiting for the read timeout.
    public func cancel() {
        task.cancel()
        queue.close()
    }

    /// Sends the request and waits for the response head. 404, other failures, TLS errors
    /// and refused connections are errors here, before anything is written.
    static func start(url: String, options: HTTPOptions, method: HTTPMethod = .GET) throws(ImageIOError) -> HTTPDownload {
        let queue = BodyQueue()
        let head = HeadBox()
        let ready = DispatchSemaphore(value: 0)
        let task = Task.detached {
            var config = HTTPClient.Configuration()
            config.timeout = .init(connect: .nanoseconds(Int64(options.connectTimeout / .nanoseconds(1))),
                                   read: .nanoseconds(Int64(options.readTimeout / .nanoseconds(1))))
            config.decompression = .disabled  // the bytes as stored: provision decompresses
            let client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: config)
            await HTTPDownload.run(client: client, url: url, method: method, options: options, queue: queue, head: head, ready: ready)
            try? await client.shutdown()
        }
        ready.wait()
        switch head.result! {
        case .failure(let error):
            task.cancel()
            throw error
        case .success(let validators):
            return HTTPDownload(url: url, validators: validators, queue: queue, task: task)
        }
    }

    /// The first `count` bytes (fewer if the body is shorter), still to be read.
    func peek(_ count: Int) throws(ImageIOError) -> [UInt8] {
        var bytes: [UInt8] = []
        var i = 0
        while bytes.count < count {
            if i == pending.count {
                guard let next = try take() else { break }
                pending.append(next)
            }
            let b = pending[i]
            bytes += b.getBytes(at: b.readerIndex, length: min(b.readableBytes, count - bytes.count)) ?? []
            i += 1
        }
        return bytes
    }

    private func take() throws(ImageIOError) -> ByteBuffer? {
        do { return try queue.take() } catch let e as ImageIOError { throw e } catch {
            throw ImageIOError(.imageUnreadable, "download of \(url) failed: \(error)")
        }
    }

    public func available() throws -> UnsafeRawBufferPointer {
        while pending.first.map({ $0.readableBytes == 0 }) ?? true {
            if !pending.isEmpty { pending.removeFirst() }
            if pending.isEmpty {
                guard let next = try take() else { return UnsafeRawBufferPointer(start: nil, count: 0) }
                pending.append(next)
            }
        }
        // The pointer stays valid while `pending` holds the buffer unmodified: until the
        // bytes are consumed and the next `available()`.
        return pending[0].withUnsafeReadableBytes { $0 }
    }

    public func consume(_ count: Int) {
        guard count > 0 else { return }
        pending[0].moveReaderIndex(forwardBy: count)
    }

    // MARK: - The receiving task

    private static func run(client: HTTPClient, url: String, method: HTTPMethod, options: HTTPOptions,
                            queue: BodyQueue, head: HeadBox, ready: DispatchSemaphore) async {
        let response: HTTPClientResponse
        do {
            var request = HTTPClientRequest(url: url)
            request.method = method
            response = try await client.execute(request, deadline: .distantFuture)
        } catch {
            head.result = .failure(describe(error, url: url, received: 0, total: nil))
            ready.signal()
            return
        }
        guard response.status == .ok else {
            head.result = .failure(statusError(response.status, url: url))
            ready.signal()
            return
        }
        let validators = HTTPValidators(etag: response.headers.first(name: "etag"),
                                        lastModified: response.headers.first(name: "last-modified"),
                                        contentLength: response.headers.first(name: "content-length").flatMap { UInt64($0) })
        let resumable = response.headers.first(name: "accept-ranges")?.lowercased() == "bytes" && validators.identifiesVersion && validators.contentLength != nil
        head.result = .success(validators)
        ready.signal()
        if method == .HEAD { queue.finish(); return }

        var body = response.body
        var failuresInARow = 0
        while true {
            do {
                for try await chunk in body {
                    if Task.isCancelled { return }
                    failuresInARow = 0
                    // The reader is gone (a write that ended, or stopped after the last range
                    // of a bmap): no use downloading the rest.
                    guard await queue.push(chunk) else { return }
                }
                let got = queue.received
                if let total = validators.contentLength, got != total {
                    throw EndedEarly(received: got, total: total)
                }
                queue.finish()
                return
            } catch {
                if Task.isCancelled || queue.isClosed { return }
                let got = queue.received
                let total = validators.contentLength
                if let total, got > total {
                    queue.finish(error: ImageIOError(.imageUnreadable, "download of \(url) is longer than the server said: \(got) bytes received, Content-Length was \(total)"))
                    return
                }
                guard resumable, failuresInARow < options.resumeAttempts else {
                    queue.finish(error: describe(error, url: url, received: got, total: total, resumable: resumable))
                    return
                }
                failuresInARow += 1
                var rest: HTTPClientResponse.Body?
                while rest == nil {
                    do {
                        rest = try await resume(client: client, url: url, from: got, validators: validators)
                    } catch let e as ImageIOError {
                        queue.finish(error: e)
                        return
                    } catch {
                        // The resumption could not connect either: again, a little later.
                        guard failuresInARow < options.resumeAttempts, !Task.isCancelled else {
                            queue.finish(error: describe(error, url: url, received: got, total: total, resumable: true))
                            return
                        }
                        failuresInARow += 1
                        try? await Task.sleep(for: .milliseconds(200 * failuresInARow))
                    }
                }
                queue.noteResumption()
                body = rest!
            }
        }
    }

    /// Asks for the rest of the same version of the body.
    private static func resume(client: HTTPClient, url: String, from offset: UInt64, validators: HTTPValidators) async throws -> HTTPClientResponse.Body {
        var request = HTTPClientRequest(url: url)
        request.headers.add(name: "Range", value: "bytes=\(offset)-")
        if let etag = validators.etag { request.headers.add(name: "If-Range", value: etag) }
        else if let modified = validators.lastModified { request.headers.add(name: "If-Range", value: modified) }
        let response = try await client.execute(request, deadline: .distantFuture)
        guard response.status == .partialContent else {
            if response.status == .ok {
                throw ImageIOError(.imageUnreadable, "the image at \(url) changed on the server during the download (it sent a new version instead of the rest); nothing was completed, write it again")
            }
            throw statusError(response.status, url: url)
        }
        let range = response.headers.first(name: "content-range") ?? ""
        guard range.hasPrefix("bytes \(offset)-") else {
            throw ImageIOError(.imageUnreadable, "the server of \(url) resumed the download at the wrong place (Content-Range: \(range), wanted byte \(offset))")
        }
        return response.body
    }

    struct EndedEarly: Error { let received: UInt64; let total: UInt64 }

    static func statusError(_ status: HTTPResponseStatus, url: String) -> ImageIOError {
        if status == .notFound || status == .gone {
            return ImageIOError(.imageMissing, "image not found: \(url) (the server says \(status.code) \(status.reasonPhrase))", httpStatus: Int(status.code))
        }
        return ImageIOError(.imageUnreadable, "cannot download \(url): the server says \(status.code) \(status.reasonPhrase)", httpStatus: Int(status.code))
    }

    /// A transport failure in words an operator can act on.
    static func describe(_ error: Error, url: String, received: UInt64, total: UInt64?, resumable: Bool = false) -> ImageIOError {
        if let e = error as? ImageIOError { return e }
        let of = total.map { " of \($0)" } ?? ""
        let noResume = resumable ? " (resuming failed too)" : " (the server does not allow resuming: no byte ranges, or no ETag/Last-Modified)"
        if let early = error as? EndedEarly {
            return ImageIOError(.imageUnreadable, "download of \(url) ended after \(early.received) of the \(early.total) bytes the server announced\(noResume); nothing was completed")
        }
        let text = String(describing: error)
        let host = URL(string: url)?.host ?? url
        if text.contains("SSL") || text.contains("TLS") || text.contains("certificate") || text.contains("handshake") {
            return ImageIOError(.imageUnreadable, "TLS failure talking to \(host) for \(url): \(text). Is the server's certificate valid and trusted on this station?")
        }
        if let e = error as? HTTPClientError, e == .readTimeout {
            return ImageIOError(.imageUnreadable, "download of \(url) stalled: nothing arrived for too long after \(received)\(of) bytes\(received > 0 ? noResume : "")")
        }
        if text.contains("connectTimeout") || text.contains("connectionRefused") || text.contains("Connection refused") {
            return ImageIOError(.imageUnreadable, "cannot connect to \(host) for \(url): \(text)")
        }
        if received > 0 {
            return ImageIOError(.imageUnreadable, "download of \(url) broke off after \(received)\(of) bytes\(noResume): \(text); nothing was completed")
        }
        return ImageIOError(.imageUnreadable, "cannot download \(url): \(text)")
    }
}

/// The response head, handed from the task to the thread waiting in `start`.
private final class HeadBox: @unchecked Sendable {
    var result: Result<HTTPValidators, ImageIOError>?
}

/// The bounded queue between the receiving task and the reading thread.
final class BodyQueue: @unchecked Sendable {
    private let condition = NSCondition()
    private var buffers: [ByteBuffer] = []
    private var queued = 0
    private var finished = false
    private var failure: ImageIOError?
    private var closed = false
    private var spaceWaiter: CheckedContinuation<Void, Never>?
    private var receivedBytes: UInt64 = 0
    private var resumed = 0
    static let limit = 8 << 20

    var received: UInt64 { condition.withLock { receivedBytes } }
    var resumptions: Int { condition.withLock { resumed } }
    var isClosed: Bool { condition.withLock { closed } }

    func noteResumption() { condition.withLock { resumed += 1 } }

    /// Adds a buffer; waits (without blocking a thread) while the queue is full. False: the
    /// reader is gone.
    func push(_ buffer: ByteBuffer) async -> Bool {
        let (open, full): (Bool, Bool) = condition.withLock {
            if closed { return (false, false) }
            buffers.append(buffer)
            queued += buffer.readableBytes
            receivedBytes += UInt64(buffer.readableBytes)
            condition.broadcast()
            return (true, queued >= BodyQueue.limit)
        }
        guard open else { return false }
        guard full else { return true }
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let resumeNow: Bool = condition.withLock {
                if queued < BodyQueue.limit || closed { return true }
                spaceWaiter = c
                return false
            }
            if resumeNow { c.resume() }
        }
        return !isClosed
    }

    func finish(error: ImageIOError? = nil) {
        condition.withLock {
            finished = true
            failure = failure ?? error
            condition.broadcast()
        }
    }

    /// The reader is gone (or stopped the download): drop what is queued and let the task end.
    func close() {
        let waiter: CheckedContinuation<Void, Never>? = condition.withLock {
            closed = true
            buffers = []
            queued = 0
            condition.broadcast()
            defer { spaceWaiter = nil }
            return spaceWaiter
        }
        waiter?.resume()
    }

    /// The next buffer; nil at the end of the body; throws what ended it early, and
    /// `cancelled` once the download was stopped.
    func take() throws -> ByteBuffer? {
        let (buffer, waiter): (ByteBuffer?, CheckedContinuation<Void, Never>?) = try condition.withLock {
            while buffers.isEmpty && !finished && !closed { condition.wait() }
            if closed { throw ImageIOError(.cancelled, "the download was stopped") }
            if buffers.isEmpty {
                if let failure { throw failure }
                return (nil, nil)
            }
            let b = buffers.removeFirst()
            queued -= b.readableBytes
            var w: CheckedContinuation<Void, Never>?
            if queued < BodyQueue.limit { w = spaceWaiter; spaceWaiter = nil }
            return (b, w)
        }
        waiter?.resume()
        return buffer
    }
}
