import CUSB
import Foundation
import Synchronization

/// Finds Tegra recovery devices through libusb and reopens them after re-enumeration.
public final class LibUSBDeviceSource: TegraDeviceSource {
    public enum Selector: Sendable {
        /// The first device whose product id is in the list (the profile's, or the known recovery ids).
        case first
        /// The device udev announced (BUSNUM/DEVNUM).
        case busAddress(bus: UInt8, address: UInt8)
    }

    /// Product ids of boot ROMs in recovery mode. Exact ids, not the low byte alone: 0955:7020
    /// (L4T running) or 0955:7035 have recovery low bytes but are running systems.
    public static let knownRecoveryProductIDs: [UInt16] = [0x7820, 0x7030, 0x7330, 0x7335, 0x7140, 0x7740]

    public let selector: Selector
    public let productIDs: [UInt16]
    /// Bus and port path of the last device opened: re-enumeration gives it a new address but the same port.
    private let lastPort = Mutex<(bus: UInt8, ports: [UInt8], productID: UInt16)?>(nil)

    /// Whether a device found on the port after re-enumeration is the same board: tegrarcm
    /// matches only the low byte of the product id (the chip), because the miniloader may
    /// enumerate with another high byte than the boot ROM did.
    public static func isSameChipAfterReenumeration(original: UInt16, found: UInt16) -> Bool {
        TegraChip(productID: found) != nil && found & 0xFF == original & 0xFF
    }

    public init(selector: Selector = .first, productIDs: [UInt16] = []) {
        self.selector = selector
        self.productIDs = productIDs.isEmpty ? Self.knownRecoveryProductIDs : productIDs
    }

    public func open() throws -> any USBTransport {
        let accepted = productIDs
        let transport = try openMatching(describe: true, productMatches: { accepted.contains($0) }) { bus, address, _ in
            switch self.selector {
            case .first: return true
            case let .busAddress(wantedBus, wantedAddress): return bus == wantedBus && address == wantedAddress
            }
        }
        lastPort.withLock { $0 = (transport.busNumber, transport.portPath, transport.productID) }
        return transport
    }

    public func reopenAfterReenumeration(timeoutSeconds: Double) throws -> any USBTransport {
        let port = lastPort.withLock { $0 }
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        var lastError: TegraError?
        repeat {
            do {
                let transport = try openMatching(describe: false, productMatches: { found in
                    guard let original = port?.productID else { return self.productIDs.contains(found) }
                    return Self.isSameChipAfterReenumeration(original: original, found: found)
                }) { bus, _, ports in
                    guard let port, !port.ports.isEmpty else { return true }
                    return bus == port.bus && ports == port.ports
                }
                lastPort.withLock { $0 = (transport.busNumber, transport.portPath, transport.productID) }
                return transport
            } catch let error as TegraError where error.kind == .noDevice || error.kind == .permissionDenied {
                // udev may not have applied the group yet to the fresh node: keep polling.
                lastError = error
            }
            Thread.sleep(forTimeInterval: 0.1)
        } while Date() < deadline
        let place = port.map { "bus \($0.bus) port \($0.ports.map(String.init).joined(separator: "."))" } ?? "the bus"
        throw TegraError(.reenumerationTimeout,
            "the device did not come back on \(place) within \(timeoutSeconds) s after the miniloader started"
            + (lastError.map { " (last attempt: \($0.message))" } ?? "")
            + "; the miniloader may not match this board: check the profile's miniloader file")
    }

    private func openMatching(describe: Bool, productMatches: (UInt16) -> Bool,
                              _ accept: (UInt8, UInt8, [UInt8]) -> Bool) throws -> LibUSBTransport {
        var context: OpaquePointer?
        let initResult = libusb_init(&context)
        guard initResult == 0, let context else {
            throw TegraError(.noDevice, "no Tegra device in recovery mode found: libusb cannot open the USB bus "
                + "(\(String(cString: libusb_error_name(initResult)))); is /dev/bus/usb present (usbfs, or a container without USB)?")
        }
        var list: UnsafeMutablePointer<OpaquePointer?>?
        let count = libusb_get_device_list(context, &list)
        guard count >= 0, let list else {
            libusb_exit(context)
            throw LibUSB.error(Int32(count), "list devices on", location: "the USB bus", node: nil)
        }
        var found: (device: OpaquePointer, productID: UInt16)?
        for index in 0..<count {
            guard let device = list[index] else { continue }
            var descriptor = libusb_device_descriptor()
            guard libusb_get_device_descriptor(device, &descriptor) == 0,
                  descriptor.idVendor == TegraChip.vendorID, productMatches(descriptor.idProduct),
                  TegraChip(productID: descriptor.idProduct) != nil else { continue }
            var ports = [UInt8](repeating: 0, count: 8)
            let portCount = libusb_get_port_numbers(device, &ports, Int32(ports.count))
            guard accept(libusb_get_bus_number(device), libusb_get_device_address(device),
                         Array(ports.prefix(max(0, Int(portCount))))) else { continue }
            found = (libusb_ref_device(device), descriptor.idProduct)
            break
        }
        libusb_free_device_list(list, 1)
        if let found {
            do {
                // The transport owns the context from here, and releases it on close.
                let transport = try LibUSBTransport(context: context, device: found.device, productID: found.productID)
                libusb_unref_device(found.device)
                return transport
            } catch {
                libusb_unref_device(found.device)
                libusb_exit(context)
                throw error
            }
        }
        libusb_exit(context)
        let wanted = productIDs.map { String(format: "0955:%04x", $0) }.joined(separator: ", ")
        let which: String
        switch selector {
        case .first: which = ""
        case let .busAddress(bus, address): which = " at bus \(bus) device \(address)"
        }
        throw TegraError(.noDevice, "no Tegra device in recovery mode found\(which) (looked for \(wanted)); "
            + "connect the board's USB OTG port, hold FORCE RECOVERY and press RESET, then check `lsusb`")
    }
}
