/// Every failure of the Tegra path, as a value a person can act on.
///
/// `kind` is for code (tests, the daemon's job state); `description` is for people:
/// it says what failed, on which device or file, and what to do next.
public struct TegraError: Error, CustomStringConvertible, Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        /// No USB device 0955:xx20/30/35/40 was found.
        case noDevice
        /// The device node exists but this process may not open it.
        case permissionDenied
        /// The device disappeared (unplugged, reset, re-enumerated) during a transfer.
        case deviceGone
        /// A bulk transfer did not complete in time.
        case timeout
        /// The device did not come back after the miniloader started.
        case reenumerationTimeout
        /// Any other libusb failure (the code is libusb's).
        case usb(Int32)
        /// A bulk OUT transfer moved fewer bytes than asked.
        case shortWrite
        /// The boot ROM sent a UID of a length no supported chip uses.
        case unexpectedUIDLength(Int)
        /// The boot ROM refused an RCM message (non-zero status, or a wrong version reply).
        case rcmRejected(UInt32)
        /// The board has secure boot fused: the zero-key CMAC is not accepted.
        case secureBoot
        /// The device's answer broke the nv3p rules (bad checksum, wrong type, wrong sequence, wrong length).
        case protocolViolation
        /// The miniloader answered NACK with this code (2 bad command, 3 bad data).
        case nack(UInt32)
        /// The miniloader reported a STATUS with a non-zero code.
        case status(UInt32)
        /// The platform info says an operating mode we must not flash.
        case unsupportedOperatingMode(UInt32)
        /// A profile input file is missing or unreadable.
        case missingInput
        /// A profile input is present but unusable (too big, malformed DTB, bad value).
        case invalidInput
        /// A 4-byte boot ROM reply came where an nv3p packet was expected: the miniloader is not running.
        case bootROMAnswered(UInt32)
        /// The board was flashed before and came back in recovery mode: it did not boot.
        case cameBack
        /// The caller asked the flasher to stop.
        case cancelled
    }

    public let kind: Kind
    public let message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { message }
}
