import SystemPackage

/// Everything that can go wrong while reading an image or writing it to a card, as a value a
/// person can act on. The `code` lets callers (the CLI's exit status, the daemon's job state)
/// tell failures apart; `description` is the sentence shown to the operator.
public struct ImageIOError: Error, CustomStringConvertible, Sendable, Equatable {
    public enum Code: String, Sendable, Equatable {
        case imageMissing, imageUnreadable
        case compressedStreamCorrupt, compressedStreamTruncated
        case imageCorrupt
        /// A container provision does not write (7z, qcow2, …), or an archive without exactly
        /// one disk image in it.
        case unsupportedFormat
        case bmapInvalid, bmapMismatch
        case deviceTooSmall, deviceReadOnly, deviceBusy, deviceRemoved, deviceChanged
        case ioError, verifyMismatch, cancelled, invalidArgument
    }

    public let code: Code
    public let message: String
    /// The byte offset the failure refers to, where one exists (device offset for I/O and
    /// verification, compressed-file offset for a corrupt stream).
    public let offset: UInt64?
    public let errno: Errno?
    /// The HTTP status a server answered with, for an image or bmap named by URL.
    public let httpStatus: Int?

    public init(_ code: Code, _ message: String, offset: UInt64? = nil, errno: Errno? = nil, httpStatus: Int? = nil) {
        self.code = code
        self.message = message
        self.offset = offset
        self.errno = errno
        self.httpStatus = httpStatus
    }

    public var description: String { message }
}

extension ImageIOError {
    /// Turns an errno from a device operation into the failure an operator recognises:
    /// a pulled card shows up as ENXIO/ENODEV/ESHUTDOWN, a locked one as EROFS/EACCES on write.
    static func device(_ errno: Errno, operation: String, path: String, offset: UInt64?) -> ImageIOError {
        let at = offset.map { " at offset \($0)" } ?? ""
        switch errno {
        case .noSuchAddressOrDevice, .operationNotSupportedByDevice, .noSuchFileOrDirectory:
            return ImageIOError(.deviceRemoved, "card removed: \(path) went away during \(operation)\(at); the card is incomplete", offset: offset, errno: errno)
        case .readOnlyFileSystem:
            return ImageIOError(.deviceReadOnly, "\(path) is write-protected: slide the card's lock switch to unlock it", offset: offset, errno: errno)
        case .resourceBusy:
            return ImageIOError(.deviceBusy, "\(path) is busy (mounted or opened by another program); unmount it or close that program", offset: offset, errno: errno)
        case .noSpace:
            // Within the card's size (that is checked before each write), ENOSPC means the
            // medium behind the device failed to take the data: an I/O error, not a size issue.
            return ImageIOError(.ioError, "I/O error\(at) on \(path) during \(operation): the medium has no space left (\(errno))", offset: offset, errno: errno)
        default:
            return ImageIOError(.ioError, "I/O error\(at) on \(path) during \(operation): \(errno)", offset: offset, errno: errno)
        }
    }
}
