import Foundation

/// What a write is doing now, for progress bars, JSON lines and the daemon's status.
public enum WritePhase: String, Sendable, Codable {
    case preparing, writing, syncing, verifying, done
}

public struct WriteProgress: Sendable, Codable, Equatable {
    public var phase: WritePhase
    /// Bytes done in this phase and the phase's total (nil when a compressed image does not
    /// say its size).
    public var bytesDone: UInt64
    public var bytesTotal: UInt64?
    /// Average bytes per second over the phase so far.
    public var bytesPerSecond: Double
    /// Seconds left in this phase, when the total is known and the rate is measurable.
    public var secondsRemaining: Double?
    /// For an image read over HTTP: bytes of it downloaded so far, and how many the server
    /// announced (the download is the write's pace: its bytes are decoded as they arrive).
    public var bytesDownloaded: UInt64? = nil
    public var downloadTotal: UInt64? = nil

    public init(phase: WritePhase, bytesDone: UInt64, bytesTotal: UInt64?, bytesPerSecond: Double, secondsRemaining: Double?) {
        self.phase = phase
        self.bytesDone = bytesDone
        self.bytesTotal = bytesTotal
        self.bytesPerSecond = bytesPerSecond
        self.secondsRemaining = secondsRemaining
    }

    public var fraction: Double? {
        guard let bytesTotal, bytesTotal > 0 else { return nil }
        return min(1, Double(bytesDone) / Double(bytesTotal))
    }
}

/// Turns byte counts into rate and ETA for one phase (a write's, or a station's download).
public struct PhaseMeter: Sendable {
    public let phase: WritePhase
    public var total: UInt64?
    public let started = ContinuousClock.now
    public var done: UInt64 = 0

    public init(phase: WritePhase, total: UInt64?) {
        self.phase = phase
        self.total = total
    }

    mutating func add(_ n: UInt64) { done += n }

    public var progress: WriteProgress { report(final: false) }

    /// The phase's last report: its rate over the whole phase, however short (a fast disk
    /// writes 24 MiB in 0.04 s, and its "100 %" line then had no rate at all). The first
    /// 50 ms of a phase give no rate otherwise: a few bytes over microseconds say nothing.
    public var finalProgress: WriteProgress { report(final: true) }

    private func report(final: Bool) -> WriteProgress {
        let elapsed = (ContinuousClock.now - started) / .seconds(1)
        let rate = elapsed > (final ? 0 : 0.05) ? Double(done) / elapsed : 0
        var eta: Double? = nil
        if let total, rate > 0 { eta = Double(total > done ? total - done : 0) / rate }
        return WriteProgress(phase: phase, bytesDone: done, bytesTotal: total, bytesPerSecond: rate, secondsRemaining: eta)
    }
}

/// A flag any thread may raise to stop a write between two chunks (Ctrl-C, `provision
/// cancel`, a card pulled in the daemon).
public final class CancellationFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var raised = false

    public init() {}

    public func cancel() { lock.withLock { raised = true } }

    public var isCancelled: Bool { lock.withLock { raised } }
}
