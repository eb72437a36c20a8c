/*
 * /init of initramfs-halt.cpio: ends a kernel-only boot.
 *
 * Executes ud2 at once. The kernel kills init with SIGILL, panics
 * ("Attempted to kill init"), and with panic=-1 resets the guest at once.
 * It makes no system call: guest user space cannot make any on
 * software-nested KVM (see tests/guest/README.md).
 */
	.text
	.globl	_start
	.type	_start, @function
_start:
	ud2
	.size	_start, . - _start

	.section .note.GNU-stack, "", @progbits
