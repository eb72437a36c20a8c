/*
 * /init of initramfs-idle.cpio: keeps a kernel-only guest alive.
 *
 * Spins on pause forever in user mode (which runs natively even on
 * software-nested KVM), so the kernel stays up for whatever the test does
 * next. It makes no system call: guest user space cannot make any on
 * software-nested KVM (see tests/guest/README.md).
 */
	.text
	.globl	_start
	.type	_start, @function
_start:
1:	pause
	jmp	1b
	.size	_start, . - _start

	.section .note.GNU-stack, "", @progbits
