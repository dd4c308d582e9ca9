#!/usr/bin/perl
# Independent DKIM verifier for the tests: Perl Mail::DKIM, keys from a given DNS server.
# usage: verify_dkim.pl HOST PORT < message ; prints "result domain selector detail" per signature
use strict;
use warnings;
use Net::DNS::Resolver;
use Mail::DKIM::Verifier;
use Mail::DKIM::DNS;

my ($host, $port) = @ARGV;
my $res = Net::DNS::Resolver->new(nameservers => [$host], port => $port, recurse => 1,
                                  tcp_timeout => 5, udp_timeout => 5, retry => 1);
Mail::DKIM::DNS::resolver($res);
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (<STDIN>) {
    s/\r?\n\z/\015\012/;
    $dkim->PRINT($_);
}
$dkim->CLOSE;
my @sigs = $dkim->signatures;
print "none\n" unless @sigs;
foreach my $sig (@sigs) {
    printf "%s %s %s %s\n", $sig->result, $sig->domain, $sig->selector, ($sig->result_detail // '');
}
