/// One open Tegra recovery-mode USB device: its two bulk endpoints.
///
/// Implementations move exactly one USB transfer per call (at most `maxTransferLength`
/// bytes); the chunking rules of the protocol live in the extension below so that the
/// libusb device and the simulated boot ROM see exactly the same transfers.
public protocol USBTransport: AnyObject {
    /// The product id the device enumerated with (its low byte names the chip).
    var productID: UInt16 { get }
    /// Human-readable location for messages, e.g. "bus 1 device 7 (0955:7140)".
    var location: String { get }

    /// One bulk OUT transfer; returns how many bytes the device took.
    func bulkOut(_ bytes: ArraySlice<UInt8>, timeoutMilliseconds: Int) throws -> Int
    /// One bulk IN transfer of at most `maxLength` bytes.
    func bulkIn(maxLength: Int, timeoutMilliseconds: Int) throws -> [UInt8]
    /// Releases the interface and closes the device; further calls fail with `.deviceGone`.
    func close()
}

/// Transfer sizes and timeouts from tegra-rcm.md ("Finding the device").
public enum USBTransferRules {
    public static let maxTransferLength = 4096
    public static let defaultTimeoutMilliseconds = 1000
}

extension USBTransport {
    public var chip: TegraChip? { TegraChip(productID: productID) }

    /// Writes all of `bytes` in pieces of at most 4096; a short piece is an error,
    /// because the boot ROM counts bytes and would wait forever for the missing ones.
    public func write(_ bytes: [UInt8], timeoutMilliseconds: Int = USBTransferRules.defaultTimeoutMilliseconds) throws {
        var offset = 0
        repeat {
            let end = min(bytes.count, offset + USBTransferRules.maxTransferLength)
            let moved = try bulkOut(bytes[offset..<end], timeoutMilliseconds: timeoutMilliseconds)
            guard moved == end - offset else {
                throw TegraError(.shortWrite,
                    "\(location): bulk OUT moved \(moved) of \(end - offset) bytes at offset \(offset) of \(bytes.count)")
            }
            offset = end
        } while offset < bytes.count
    }

    /// Reads up to `maxLength` bytes in pieces of at most 4096, stopping at the first short piece.
    public func read(upTo maxLength: Int, timeoutMilliseconds: Int = USBTransferRules.defaultTimeoutMilliseconds) throws -> [UInt8] {
        var result = [UInt8]()
        while result.count < maxLength {
            let want = min(USBTransferRules.maxTransferLength, maxLength - result.count)
            let piece = try bulkIn(maxLength: want, timeoutMilliseconds: timeoutMilliseconds)
            result.append(contentsOf: piece)
            if piece.count < want { break }
        }
        return result
    }
}

/// Where the flasher gets its device from, and gets it again after the miniloader
/// starts and the device drops off the bus and comes back (re-enumeration).
public protocol TegraDeviceSource: Sendable {
    /// Opens the device in recovery mode.
    func open() throws -> any USBTransport
    /// Waits up to `timeoutSeconds` for the device to come back after re-enumeration and opens it.
    func reopenAfterReenumeration(timeoutSeconds: Double) throws -> any USBTransport
}
